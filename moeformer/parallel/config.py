"""`ParallelConfig`: how a world of processes splits into data, expert, tensor and pipeline parallel groups."""

from __future__ import annotations

from dataclasses import dataclass, replace

from moeformer.errors import ConfigError
from moeformer.models.config import ModelConfig

EP_DISPATCHERS = ("auto", "all_to_all", "all_gather")  # how tokens reach experts under expert parallelism (expert.py)


def check_ep_dispatcher(name: str) -> None:
    """ConfigError unless `name` is one of EP_DISPATCHERS (the config's field, or a name given to expert.py)."""
    if name not in EP_DISPATCHERS:
        raise ConfigError(f"parallel.ep_dispatcher must be one of {EP_DISPATCHERS}, got {name!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes of the four parallel dimensions. world = dp * tp * pp; expert parallelism splits the dp * tp ranks of
    a pipeline stage (ep divides dp * tp): each group of `ep` consecutive ranks shares one copy of every expert.
    `dp=None` means "whatever is left of the world" (see `resolve`). `expert_tp` splits each routed expert's hidden
    units over the tensor group too (otherwise routed experts are replicated there and split the tokens).
    `ep_chunks`: the all-to-alls of each MoE layer go in that many pieces (blocks of local experts), each one's
    communication overlapping the others' expert GEMMs (see parallel/expert.py). `ep_dispatcher`: "all_to_all"
    sends each slot's row to its expert's rank (any local dispatcher); "all_gather" sends every token to every rank
    of the expert group once and sums the partial outputs back (dropless only; static shapes, no host sync);
    "auto" (default) takes the all-gather for dropless layers at ep=2, else the all-to-all. Also the `parallel`
    section of the training config."""

    dp: int | None = None
    ep: int = 1
    tp: int = 1
    pp: int = 1
    expert_tp: bool = False
    ep_chunks: int = 2
    ep_dispatcher: str = "auto"

    def __post_init__(self) -> None:
        """What can be checked without the world size (the training config's `parallel` section is this class)."""
        for name in ("ep", "tp", "pp", "ep_chunks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        check_ep_dispatcher(self.ep_dispatcher)
        if self.expert_tp and (self.tp == 1 or self.ep > 1):
            raise ConfigError(f"expert_tp needs tp > 1 and ep = 1 (got tp={self.tp}, ep={self.ep})")

    def resolve(self, world_size: int) -> ParallelConfig:
        """This config with `dp` filled in from the world size; ValueError naming the sizes that do not fit."""
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not divisible by tp={self.tp} * pp={self.pp}")
        dp = world_size // model_parallel if self.dp is None else self.dp
        if dp < 1 or dp * model_parallel != world_size:
            raise ValueError(
                f"dp={dp} * tp={self.tp} * pp={self.pp} = {dp * model_parallel} != world size {world_size}"
            )
        if dp * self.tp % self.ep:
            raise ValueError(
                f"ep={self.ep} does not divide dp * tp = {dp * self.tp} (world {world_size} / "
                f"pp={self.pp}): expert parallelism splits the ranks of a pipeline stage"
            )
        return replace(self, dp=dp)

    def validate_model(self, config: ModelConfig) -> None:
        """ValueError naming the model size that the parallel sizes do not divide (experts, heads, layers, vocab)."""
        problems = []
        if config.quantization and (self.ep > 1 or self.tp > 1 or self.pp > 1):
            problems.append(
                f"a {config.quantization['mode']}-quantized model runs on one device; parallelise the "
                "full-precision model"
            )
        if self.ep > 1:
            if config.moe is None:
                problems.append(f"ep={self.ep} needs a MoE model, {config.name!r} has no experts")
            elif config.moe.num_experts % self.ep:
                problems.append(f"ep={self.ep} does not divide num_experts={config.moe.num_experts}")
        if self.tp > 1:
            if config.n_heads % self.tp:
                problems.append(f"tp={self.tp} does not divide n_heads={config.n_heads}")
            if config.n_kv_heads % self.tp and self.tp % config.n_kv_heads:
                problems.append(f"tp={self.tp} and n_kv_heads={config.n_kv_heads}: one must divide the other")
            if config.ffn_dim % self.tp:
                problems.append(f"tp={self.tp} does not divide ffn_dim={config.ffn_dim}")
            if config.vocab_size % self.tp:
                problems.append(f"tp={self.tp} does not divide vocab_size={config.vocab_size}")
            if config.moe is not None and config.moe.shared_hidden % self.tp:
                problems.append(f"tp={self.tp} does not divide the shared expert width {config.moe.shared_hidden}")
            if self.expert_tp and config.moe is not None and config.moe.ffn_dim % self.tp:
                problems.append(f"expert_tp: tp={self.tp} does not divide the expert width {config.moe.ffn_dim}")
        if config.n_layers % self.pp:
            problems.append(f"pp={self.pp} does not divide n_layers={config.n_layers}")
        if problems:
            raise ValueError("parallel layout does not fit the model: " + "; ".join(problems))

    @property
    def expert_data_parallel_size(self) -> int:
        """Ranks of one pipeline stage holding the same expert shard (their expert gradients are summed)."""
        if self.dp is None:
            raise ValueError("call resolve(world_size) first: dp is not known yet")
        return self.dp * self.tp // self.ep
