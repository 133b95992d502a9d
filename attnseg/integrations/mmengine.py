"""mmengine hook converting a model's attention modules with :func:`attnseg.convert_model`.

In an mmsegmentation (mmengine) config::

    custom_imports = dict(imports=["attnseg.integrations.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="ConvertAttentionHook")]          # options: backend="auto", verbose=True

Importing this module registers ``ConvertAttentionHook`` in mmengine's ``HOOKS`` registry
(mmsegmentation's registry falls back to it). The hook converts the model in ``before_run``,
which ``Runner.train()``, ``Runner.val()`` and ``Runner.test()`` all call before their first
iteration (and before a checkpoint is loaded or resumed: the state_dict keys do not change, so
checkpoints load the same), and logs the :class:`attnseg.ConversionReport`.

By then the Runner has built the optimizer and may have wrapped the model in
(MM)DistributedDataParallel. That is safe for this conversion because the replacements hold the
very Parameter objects the optimizer and DDP's gradient buckets already hold, and DDP keeps no
reference to the submodules that are swapped. Outside mmengine, convert before wrapping.
"""

from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from .. import convert_model
from .._backends import check_backend

__all__ = ["ConvertAttentionHook"]


@HOOKS.register_module()
class ConvertAttentionHook(Hook):
    """Run :func:`attnseg.convert_model` on ``runner.model`` before training, validation or testing.

    Args:
        backend: "auto", "native", "triton", "chunked" or "reference", given to every replacement.
        verbose: log the conversion report through ``runner.logger`` (always logs a one-line
            summary).
    """

    priority = "VERY_HIGH"  # before hooks that look at the model (EMA copies, for one)

    def __init__(self, backend: str = "auto", verbose: bool = True):
        self.backend = check_backend(backend)
        if not isinstance(verbose, bool):
            raise TypeError(f"ConvertAttentionHook: verbose must be a bool, got {verbose!r}")
        self.verbose = verbose
        self.report = None  # the ConversionReport of the last conversion

    def before_run(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        converted, self.report = convert_model(model, backend=self.backend, return_report=True)
        if converted is not model:  # the model itself was one attention module
            raise TypeError(
                f"ConvertAttentionHook: runner.model is itself a {type(model).__name__}; "
                "wrap it in a segmentor (the hook converts submodules in place)"
            )
        text = str(self.report) if self.verbose else str(self.report).splitlines()[0]
        runner.logger.info(text)
