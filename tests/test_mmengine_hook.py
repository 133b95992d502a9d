"""attnseg.integrations.mmengine: the config lines of the README, a real mmengine Runner on the
CPU, a toy segmentor with the official PAM_Module / CAM_Module, two training iterations."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import attnseg

mmengine = pytest.importorskip("mmengine")
from mmengine.config import Config  # noqa: E402
from mmengine.evaluator import BaseMetric  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from test_modules import CAM_Module, PAM_Module  # noqa: E402

CONFIG_LINES = """
custom_imports = dict(imports=["attnseg.integrations.mmengine"], allow_failed_imports=False)
custom_hooks = [dict(type="ConvertAttentionHook")]
"""


class ToySegmentor(BaseModel):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pam = PAM_Module(16)
        self.cam = CAM_Module(16)
        self.cls = nn.Conv2d(16, 2, 1)
        with torch.no_grad():
            self.pam.gamma.fill_(0.5)
            self.cam.gamma.fill_(-0.3)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        feats = torch.relu(self.stem(inputs))
        logits = self.cls(self.pam(feats) + self.cam(feats))
        if mode == "loss":
            return {"loss": nn.functional.cross_entropy(logits, data_samples)}
        return logits


class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(4, 3, 6, 5, generator=gen, dtype=torch.float64)
        self.labels = torch.randint(0, 2, (4, 6, 5), generator=gen)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"inputs": self.images[i], "data_samples": self.labels[i]}


class RecordLoss(Hook):
    def __init__(self):
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses.append(outputs["loss"].item())


def _reference_losses(model, dataset, steps=2, batch_size=2, lr=0.01):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        batch = [dataset[i] for i in range(step * batch_size, (step + 1) * batch_size)]
        images = torch.stack([b["inputs"] for b in batch])
        labels = torch.stack([b["data_samples"] for b in batch])
        loss = model(images, labels, mode="loss")["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_runner_converts_the_model_and_trains_with_the_unconverted_losses(tmp_path):
    config_file = tmp_path / "attnseg_hook.py"
    config_file.write_text(CONFIG_LINES)
    cfg = Config.fromfile(str(config_file))  # custom_imports registers ConvertAttentionHook

    torch.manual_seed(0)
    model = ToySegmentor().double()
    unconverted = copy.deepcopy(model)
    dataset = Pairs()
    recorder = RecordLoss()
    runner = Runner(
        model=model,
        work_dir=str(tmp_path / "work"),
        train_dataloader=dict(dataset=dataset, sampler=dict(type="DefaultSampler", shuffle=False),
                              batch_size=2, num_workers=0, collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=False, max_iters=2, val_interval=1000),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01)),
        default_hooks=dict(checkpoint=None, logger=dict(type="LoggerHook", interval=1)),
        custom_hooks=[*cfg.custom_hooks, recorder],
        default_scope=None,
        env_cfg=dict(dist_cfg=dict(backend="gloo")),
        randomness=dict(seed=0),
    )
    runner.train()

    assert isinstance(runner.model.pam, attnseg.PositionAttention)
    assert isinstance(runner.model.cam, attnseg.ChannelAttention)
    hook = next(h for h in runner.hooks if type(h).__name__ == "ConvertAttentionHook")
    assert [c.name for c in hook.report.converted] == ["pam", "cam"]
    assert len(recorder.losses) == 2
    expected = _reference_losses(unconverted, dataset)
    assert recorder.losses == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the second loss depends on the first step's update through the converted modules
    assert recorder.losses[1] != pytest.approx(recorder.losses[0], rel=1e-6)


class MeanLogit(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results.append(torch.stack(list(data_samples)).mean().item())  # the evaluator hands a list

    def compute_metrics(self, results):
        return {"mean_logit": sum(results) / len(results)}


def test_runner_test_converts_before_testing(tmp_path):
    import attnseg.integrations.mmengine  # noqa: F401  (the import registers the hook; here, without a config)

    torch.manual_seed(0)
    model = ToySegmentor().double()
    unconverted = copy.deepcopy(model).eval()
    dataset = Pairs()
    runner = Runner(
        model=model,
        work_dir=str(tmp_path / "work"),
        test_dataloader=dict(dataset=dataset, sampler=dict(type="DefaultSampler", shuffle=False),
                             batch_size=2, num_workers=0, collate_fn=dict(type="default_collate")),
        test_cfg=dict(),
        test_evaluator=[MeanLogit()],
        default_hooks=dict(checkpoint=None),
        custom_hooks=[dict(type="ConvertAttentionHook", verbose=False)],
        default_scope=None,
    )
    metrics = runner.test()
    assert isinstance(runner.model.pam, attnseg.PositionAttention)
    with torch.no_grad():
        expected = [unconverted(dataset.images[i:i + 2]).mean().item() for i in (0, 2)]
    assert metrics["mean_logit"] == pytest.approx(sum(expected) / 2, rel=1e-9)


def test_attnseg_imports_without_mmengine():
    code = ("import sys; sys.modules['mmengine'] = None\n"  # any import of mmengine now fails
            "import attnseg, attnseg.integrations, attnseg.convert, attnseg.onnx\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(__import__("pathlib").Path(attnseg.__file__).parents[1]))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
