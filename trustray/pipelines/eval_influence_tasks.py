"""Ray task bodies of the influence evaluation. Each loads the model itself: on a cluster it runs where its GPU is.

Examples may carry the cached output of the frozen decoder layers (`inputs_embeds`); `prefix` is how many
layers that output skips.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trustray.core.influence.warmup import WarmupSettings

if TYPE_CHECKING:
    from trustray.pipelines.eval_influence import EvalInfluenceConfig


def load_base(config: EvalInfluenceConfig) -> Any:
    """The base model on this task's device (a GPU when its resources ask for one), torch threads pinned."""
    import torch

    from trustray.models.loading import gpu_or_cpu, load_causal_lm

    if config.resources.torch_threads is not None:
        torch.set_num_threads(config.resources.torch_threads)
    return load_causal_lm(config.model, gpu_or_cpu(config.resources.num_gpus > 0))


def fresh_lora(config: EvalInfluenceConfig, seed: int) -> Any:
    import torch

    from trustray.core.influence.warmup import add_lora

    base = load_base(config)
    torch.manual_seed(seed)  # every retrain starts from the same adapter initialisation
    return add_lora(base, config.lora)


def cache_prefix(config: EvalInfluenceConfig, groups: dict[str, list[dict]]) -> tuple[int, dict[str, list[Any]]]:
    """(frozen layers skipped, each group's cached prefix output per example; empty lists when nothing is frozen)."""
    from trustray.core.lm.prefix import frozen_prefix_length, prefix_states

    model = fresh_lora(config, 0).eval()
    layers = frozen_prefix_length(model)
    if layers == 0:
        return 0, {name: [] for name in groups}
    return layers, {
        name: prefix_states(model, examples, layers, config.features.batch_size) for name, examples in groups.items()
    }


def score_task(config: EvalInfluenceConfig, checkpoint_dir: str, groups: dict[str, list[dict]], prefix: int) -> dict:
    """Exact and reduced score matrices at one warmup checkpoint (`compare_reductions` over `config.features`)."""
    from trustray.core.influence.checkpoint import CheckpointGradients
    from trustray.core.influence.comparison import compare_reductions
    from trustray.core.lm.prefix import skipped_prefix

    gradients = CheckpointGradients.load(
        checkpoint_dir, load_base(config), precondition=True, micro_batch_size=config.features.batch_size
    )
    with skipped_prefix(gradients.model, prefix):
        return compare_reductions(gradients, groups, config.features)


def target_losses(config: EvalInfluenceConfig, model: Any, targets: list[dict], prefix: int) -> list[float]:
    """Each target's mean response loss under `model` (its frozen prefix bypassed)."""
    import torch

    from trustray.core.lm.batching import collate
    from trustray.core.lm.losses import example_losses
    from trustray.core.lm.prefix import skipped_prefix

    device = next(model.parameters()).device
    size = config.features.batch_size
    model.eval()
    with skipped_prefix(model, prefix):
        losses = [example_losses(model, {k: v.to(device) for k, v in collate(targets[i : i + size], 0).items()})
                  for i in range(0, len(targets), size)]
    return torch.cat(losses).cpu().tolist()


def retrain_task(config: EvalInfluenceConfig, pool: list[dict], indices: list[int], targets: list[dict],
                 prefix: int, settings: WarmupSettings) -> list[float]:
    """Fresh LoRA trained on the pool examples at `indices`; returns each target's mean response loss afterwards."""
    from trustray.core.influence.warmup import train_lora
    from trustray.core.lm.prefix import skipped_prefix

    model = fresh_lora(config, settings.seed)
    with skipped_prefix(model, prefix):
        train_lora(model, [pool[i] for i in indices], settings, progress_bar=False)
    return target_losses(config, model, targets, prefix)


def base_losses_task(config: EvalInfluenceConfig, targets: list[dict], prefix: int) -> list[float]:
    """Target losses before any fine-tuning (a fresh adapter's B is zero, so it changes nothing)."""
    return target_losses(config, fresh_lora(config, 0), targets, prefix)
