"""Typed dataclass configs for every stage and the named presets `tiny`, `small`, `paper`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from onerec.errors import UsageError
from onerec.serving import layout


@dataclass(frozen=True)
class DataConfig:
    """How interactions become sessions (paper: history of positives, target = next m positives)."""

    session_len: int = 5  # m: items per target session
    history_len: int = 256  # n: most recent positives kept as history
    min_history: int = 1  # a target needs at least this many positives before it
    positive_rating: float = 4.0  # MovieLens: rating >= this is a positive interaction
    train_stride: int = 5  # step between consecutive training targets (5 = non-overlapping)
    # "session": test/val targets are each user's last two m-item sessions (the paper's task, MovieLens);
    # "leave_one_out": the last item is the test target, the one before validation (the public sequence tables)
    protocol: str = "session"


@dataclass(frozen=True)
class TokenizerConfig:
    """Balanced residual k-means: L levels x K codes."""

    levels: int = 3  # L
    codes: int = 32  # K per level
    iters: int = 25  # Lloyd iterations per level
    embedding_dim: int = 64  # collaborative (PPMI-SVD) item embedding size
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    unique: bool = True  # collision-free last level (onerec.tokenizer.unique): every item reachable (coverage 1.0)
    # weight of the item attributes (brand/category ids the source has, e.g. Amazon's *_item2attributes.json) as
    # pseudo-users in the PPMI-SVD embeddings; 0 = interactions only. Sources without attributes ignore it
    attribute_weight: float = 1.0
    # 0: items co-occur anywhere in a user's positives; W > 0: only at most W apart in the user's time order (weight
    # 1/distance), so the first SID levels follow what comes next (on Beauty the next item shares the last one's first
    # code 28% of the time with W = 3 and attribute_weight 0, 15% with 0; the attributes at weight 1 swamp the window
    # counts: 14%; docs/QUALITY.md)
    cooccurrence_window: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Encoder-decoder shapes. `levels`/`codes` must match the catalog the model is trained on."""

    levels: int = 3  # L
    codes: int = 32  # K codes per level (vocabulary of each output head)
    history_len: int = 256  # n: encoder positions (one per history item)
    session_len: int = 5  # m: items generated per session
    d_model: int = 128
    n_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    d_ff: int = 256  # encoder FFN and per-expert hidden size
    n_experts: int = 8  # decoder MoE experts
    top_k: int = 2  # experts per token
    dropout: float = 0.1  # embeddings and residual branches
    # on the attention weights: off by default, it cost 17% of a CPU training step (the fused attention kernel
    # cannot drop weights, so a (B, H, N, N) Bernoulli mask was drawn) and did not help (docs/QUALITY.md)
    attn_dropout: float = 0.0
    aux_loss_coef: float = 0.01  # MoE load-balancing loss weight
    # > 0: the encoder adds a per-item embedding to the history items' summed code embeddings, row
    # `item_row(sid) % item_buckets` (onerec.model.onerec.item_rows). With item_buckets >= K^L every SID has
    # its own row (as SASRec's item table); 0 = codes only (the paper's encoder input)
    item_buckets: int = 0
    # > 0: every decoder level adds a per-trie-node output row: the logit of code c after prefix p gets
    # h . Node[row] + bias[row], row = `node_rows(p, c)` (the path (p, c) as one number with a level offset, mixed
    # into [0, node_buckets); a bijection when node_buckets is a power of two >= K + K^2 + .. + K^L). A hierarchical
    # softmax with a learned vector per prefix and per item; rows start at zero. 0 = the shared level heads only
    node_buckets: int = 0
    # True: each history item's encoder input also adds sum_a Attr[a] over its content attributes (the source's
    # attribute file, e.g. Amazon's brand/category ids; sources without one ignore it), looked up through the
    # per-item rows (needs item_buckets > 0). `attribute_rows` and `attributes_per_item` are set by training from
    # the file (0 = off): rows of the attribute table (distinct attributes + a zero padding row 0) and the width
    # of the per-item attribute list. The lists are fixed at training (part of the weights and the exported
    # encoder): an item `catalog add` brings later reads none, as its per-item row is zero too
    item_attributes: bool = False
    attribute_rows: int = 0
    attributes_per_item: int = 0
    # True (with the attributes above and node_buckets > 0): the output side reads them too. The node row that ends
    # an item's SID (its last level) adds sum_a AttrOut[a] over the item's attributes, a zero-initialised table of
    # its own, so the items of one brand or category share what their output rows learn (Beauty test R@10 +6%)
    node_attributes: bool = False
    # True: each history item attends only to itself and older items (most recent first: index n sees m >= n), so
    # the encoder state at n summarises the history up to that item and one pass trains every position at once
    # (`TrainConfig.all_positions`, SASRec's regime); serving reads all of them, as before
    causal_encoder: bool = False
    # True: every level's output state adds the encoder state of the most recent history item (the user vector; of
    # item n in `forward_positions`), so the levels score as a hierarchical softmax of that vector over the trie and
    # the decoder adds what each prefix changes. On Beauty the decoder alone overfit (docs/QUALITY.md)
    user_skip: bool = False
    # False: the shared per-level heads are fixed at zero, so a code's logit is its trie node's row alone (with
    # node_buckets): a pure hierarchical softmax, as runs/exp/hsm.py scored it (docs/QUALITY.md)
    level_heads: bool = True
    # std of the node rows' initialisation; 0 = zeros (a SID never trained adds nothing to the heads). Without level
    # heads, zero rows give the states no gradient until the rows move
    node_init_std: float = 0.0

    @property
    def decoder_len(self) -> int:
        """Decoder positions: [BOS, s1, .., sL] per item, m items."""
        return self.session_len * (self.levels + 1)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class TrainConfig:
    """Next-token training recipe."""

    lr: float = 2e-4  # paper
    warmup_steps: int = 200
    batch_size: int = 64
    epochs: int = 10
    weight_decay: float = 0.0  # AdamW's decoupled decay (with 0 AdamW is Adam)
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0  # 0 = torch default
    # shuffle the items of each target session every epoch: the first position then learns every next item,
    # which is what the ranked answer (BeamConfig.session_len = 1) and the set-based Recall@K ask of it
    shuffle_targets: bool = False
    # which epoch is kept (RUN/model): "val_loss" (lowest), or a ranking metric of the next items beam search
    # ranks on validation ("ndcg@10" | "recall@10", the highest), on `select_users` sessions spread evenly over it
    select: str = "val_loss"
    select_users: int = 2000
    # each level's softmax over the trie's valid children of the true prefix only (ValidCodes), the choice
    # constrained beam search makes, instead of all K codes: the model is not taught to push down (prefix, code)
    # pairs that hold no item (which also made it refuse SIDs `catalog add` gives later); docs/QUALITY.md
    constrained_loss: bool = False
    # train on each user's whole training sequence in one pass (needs ModelConfig.causal_encoder and one-item
    # targets): every history position predicts the item after it, the decoder reading only the encoder states
    # up to that item (SASRec's regime: one forward per user instead of one per window)
    all_positions: bool = False
    # an exponential moving average of the weights, updated after every optimizer step with this decay (0: off);
    # validation, model selection and RUN/model use the averaged weights (torch.optim.swa_utils.AveragedModel)
    ema_decay: float = 0.0


@dataclass(frozen=True)
class BeamConfig:
    """Beam search settings shared by evaluation, export and serving."""

    beam_width: int = layout.DEFAULT_BEAM_WIDTH
    num_sessions: int = layout.DEFAULT_NUM_SESSIONS  # R best sessions returned
    exclude_history: bool = True
    # items per generated session when serving and evaluating. 1: the answer is the model's R best next items,
    # ranked by beam search (beats the best whole session by 23% Recall@5 on ml-100k, docs/QUALITY.md);
    # 0: whole sessions of the model's m items (the reward model and IPA always generate whole sessions)
    session_len: int = 1


@dataclass(frozen=True)
class Preset:
    """One named bundle of every stage's config."""

    name: str
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    beam: BeamConfig = field(default_factory=BeamConfig)


PRESETS: dict[str, Preset] = {
    # What unit tests use: seconds on a CPU.
    "tiny": Preset(
        name="tiny",
        data=DataConfig(history_len=32, train_stride=1),
        tokenizer=TokenizerConfig(codes=8, iters=10, embedding_dim=16),
        model=ModelConfig(
            codes=8, history_len=32, d_model=32, n_heads=2, encoder_layers=1, decoder_layers=1,
            d_ff=64, n_experts=4, top_k=2, dropout=0.0,
        ),
        train=TrainConfig(lr=3e-3, warmup_steps=10, batch_size=32, epochs=3),
        beam=BeamConfig(beam_width=16, num_sessions=4, session_len=0),  # tests decode whole sessions
    ),
    # What the CPU demo trains on ml-100k: lr 1e-3 (the paper's 2e-4 left the model under-trained in 10 epochs),
    # the epoch kept by the validation ranking; serves the ranked next items (BeamConfig.session_len = 1). Every
    # level adds a per-trie-node output row and the user vector (the most recent item's state) beside the gated
    # decoder state, as small-seq: test R@5 / N@5 over three seeds 0.0748 / 0.0769 -> 0.0768 / 0.0800. What is
    # validated, kept and served is an EMA of the weights (decay 0.995, a half-life of ~1 epoch of 136 steps):
    # three seeds 0.0768 / 0.0800 -> 0.0813 / 0.0845, every seed above EASE, the spread 0.0713-0.0829 -> 0.0767-0.0842
    # (docs/QUALITY.md)
    "small": Preset(
        name="small",
        model=ModelConfig(node_buckets=65536, user_skip=True),  # 65536 >= 32 + 32^2 + 32^3 nodes: a row each
        train=TrainConfig(lr=1e-3, select="ndcg@10", select_users=1000, ema_decay=0.995),
    ),
    # Leave-one-out sequence data (`--source sequences`: Amazon Beauty/Toys, ~22k users of ~9 items): the next item
    # only; SIDs from sequence-window co-occurrence (the first levels follow what comes next), two levels of 128
    # (level-1 clusters of ~95 items, then the item; fit_shape adds a level past 16,384 items); a causal encoder
    # trained on every position of each user's sequence at once; every level scored from the user vector (the most
    # recent item's state) through a row per trie node, the MoE decoder gated in from 0; SASRec's size, dropout 0.5
    # (SASRec's setting for Beauty; 0.2 overfit after epoch 4), 16 epochs (the test split still gains from 12 to 16,
    # not from 16 to 20); the items' attributes (Amazon's brand/category ids) in the encoder input and weight decay
    # 0.1 (Toys +5%, Beauty the same), and on the output side, in the node row that ends each item's SID (Beauty
    # +1-6% per metric and seed). Test R@5 / N@5, Beauty two seeds 0.0599 / 0.0435 and 0.0621 / 0.0454: above TIGER's
    # published rows, EASE and the in-project SASRec (0.0587 / 0.0430) on all four metrics (docs/QUALITY.md)
    "small-seq": Preset(
        name="small-seq",
        data=DataConfig(session_len=1),
        tokenizer=TokenizerConfig(attribute_weight=0.0, cooccurrence_window=3, codes=128, levels=2),
        model=ModelConfig(
            d_model=64, n_heads=1, d_ff=64, dropout=0.5, item_buckets=32768, node_buckets=65536,
            causal_encoder=True, user_skip=True, level_heads=False, node_init_std=0.125, item_attributes=True,
            node_attributes=True,
        ),
        train=TrainConfig(lr=1e-3, batch_size=128, epochs=16, warmup_steps=100, all_positions=True,
                          select="ndcg@10", select_users=2000, weight_decay=0.1),
    ),
    # The paper's shapes (OneRec, Kuaishou): K=8192, L=3, 24 experts top-2, history 256, session 5.
    "paper": Preset(
        name="paper",
        tokenizer=TokenizerConfig(codes=8192, iters=25, embedding_dim=64),
        model=ModelConfig(
            codes=8192, d_model=1024, n_heads=16, encoder_layers=6, decoder_layers=6,
            d_ff=4096, n_experts=24, top_k=2, dropout=0.1,
        ),
        train=TrainConfig(lr=2e-4, warmup_steps=2000, batch_size=256, epochs=1),
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`, or a UsageError naming the known ones."""
    if name not in PRESETS:
        raise UsageError(f"--preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a flat config dataclass from `to_dict` output, rejecting unknown keys."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    return cls(**data)


def save_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (tmp file + rename) so readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
