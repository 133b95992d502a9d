"""Convert the attention modules of an mmengine / mmsegmentation model from its config.

Add these two lines to the config (mmseg's DANet configs, for example
configs/danet/danet_r50-d8_4xb2-40k_cityscapes-512x1024.py, through a config that inherits it):

    custom_imports = dict(imports=["attnseg.integrations.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="ConvertAttentionHook")]

and train, validate or test as usual (tools/train.py, tools/test.py): before the first iteration
the hook swaps mmseg's PAM / CAM (and any other module attnseg.convert_model recognises) for
attnseg's fused ones and logs what it converted. Checkpoints load unchanged.

This script shows it without mmsegmentation: it writes the two lines to a config file, loads
it with mmengine's Config (which runs custom_imports), and trains a toy model that contains
mmseg-style PAM and CAM modules for a few iterations with a real mmengine Runner on the CPU.

    python examples/mmengine_hook.py [--iters 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.nn import functional as F

CONFIG_LINES = '''
custom_imports = dict(imports=["attnseg.integrations.mmengine"], allow_failed_imports=False)
custom_hooks = [dict(type="ConvertAttentionHook")]
'''


class Scale(nn.Module):  # mmcv.cnn.Scale
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x):
        return x * self.scale


class SelfAttentionBlock(nn.Module):  # mmseg's, reduced to the options DAHead's PAM uses
    def __init__(self, in_channels, channels):
        super().__init__()
        self.key_in_channels = self.query_in_channels = self.out_channels = in_channels
        self.channels = channels
        self.share_key_query, self.matmul_norm = False, False
        self.query_downsample = self.key_downsample = self.out_project = None
        self.key_project = nn.Conv2d(in_channels, channels, 1)
        self.query_project = nn.Conv2d(in_channels, channels, 1)
        self.value_project = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, query_feats, key_feats):
        b = query_feats.shape[0]
        query = self.query_project(query_feats).flatten(2).transpose(1, 2)
        key = self.key_project(key_feats).flatten(2)
        value = self.value_project(key_feats).flatten(2).transpose(1, 2)
        context = torch.matmul(F.softmax(torch.matmul(query, key), dim=-1), value)
        return context.transpose(1, 2).reshape(b, -1, *query_feats.shape[2:])


class PAM(SelfAttentionBlock):  # mmseg/models/decode_heads/da_head.py
    def __init__(self, in_channels, channels):
        super().__init__(in_channels, channels)
        self.gamma = Scale(0)

    def forward(self, x):
        return self.gamma(super().forward(x, x)) + x


class CAM(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = Scale(0)

    def forward(self, x):
        b, c, h, w = x.shape
        flat = x.view(b, c, -1)
        energy = torch.bmm(flat, flat.transpose(1, 2))
        attention = F.softmax(torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy, dim=-1)
        return self.gamma(torch.bmm(attention, flat).view(b, c, h, w)) + x


class ToySegmentor(BaseModel):
    def __init__(self, channels=32, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.pam, self.cam = PAM(channels, channels // 8), CAM()
        self.cls = nn.Conv2d(channels, classes, 1)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        feats = F.relu(self.stem(inputs))
        logits = self.cls(self.pam(feats) + self.cam(feats))
        return {"loss": F.cross_entropy(logits, data_samples)} if mode == "loss" else logits


class RandomImages(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        return {"inputs": torch.randn(3, 24, 24, generator=gen), "data_samples": torch.randint(0, 3, (24, 24), generator=gen)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="attnseg's ConvertAttentionHook in an mmengine Runner")
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work_dir:
        config_path = os.path.join(work_dir, "attnseg_hook.py")
        with open(config_path, "w") as f:
            f.write(CONFIG_LINES)
        cfg = Config.fromfile(config_path)
        runner = Runner(
            model=ToySegmentor(),
            work_dir=work_dir,
            train_dataloader=dict(dataset=RandomImages(), sampler=dict(type="DefaultSampler", shuffle=True),
                                  batch_size=2, num_workers=0, collate_fn=dict(type="default_collate")),
            train_cfg=dict(by_epoch=False, max_iters=args.iters),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01)),
            default_hooks=dict(checkpoint=None, logger=dict(type="LoggerHook", interval=1)),
            custom_hooks=cfg.custom_hooks,
            default_scope=None,
        )
        runner.train()
        print(f"after training: pam is {type(runner.model.pam).__name__}, cam is {type(runner.model.cam).__name__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
