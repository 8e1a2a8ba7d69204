"""Quantization configs: which sites are quantized, at what bit width, with which observer.

A site is named by its module path (see `clip/model.py`): `visual/transformer/
resblocks_3/mlp/c_fc`. Its kind is `weight` (a Dense/Conv kernel), `input` (a Dense/Conv
input), `attn` (the attention tensors `.../attn/{q,k,v,logits,probs}`) or `norm` (a
LayerNorm input, e.g. `.../resblocks_3/ln_1`; the PTF observer is made for these). A QConfig is an
ordered list of rules `(kind, regex, spec)`; the first rule whose kind matches and whose
regex matches the site name (`re.search`) decides; `spec=None` keeps the site in float.

Presets (`QConfig.parse(name)`):

* `w{W}a{A}` and `w{W}a{A}attn{S}` -- the P4Q paper's recipe, a true low-bit model in
  both towers: every kernel int{W}, symmetric, per output channel, MinMax; every linear
  input uint{A}, asymmetric, per tensor, OMSE; the attention q/k/v/logits uint{S}
  (S = A if not given), asymmetric, per tensor, OMSE; the softmax probabilities
  uint{S} per tensor, MinMax. E.g. `w8a8`, `w6a6`, `w4a4attn8`.

* `official` -- exactly what the public PyTorch P4Q code (HuixinSun/P4Q_official, its
  `QCLIP` with `Config(bit_type=4)`, the CIFAR-100 ViT-B/32 "4-4-8" run) quantizes,
  read from its `models/clip/model.py` and `config.py`, site by site:
    - `visual/conv1` kernel: int4, symmetric, per output channel, MinMax;
    - `visual/conv1` input (the image): uint4, asymmetric, per RGB channel, OMSE;
    - `attn/in_proj`, `attn/out_proj`, `mlp/c_fc`, `mlp/c_proj` kernels of every block
      of both towers: int8, symmetric, per output channel, MinMax;
    - inputs of `attn/in_proj` (after ln_1), `mlp/c_fc` (after ln_2) and `mlp/c_proj`
      (after QuickGELU): uint8, asymmetric, *per channel* (its `CALIBRATION_MODE_A_v =
      'channel_wise'`), OMSE;
    - float: the `out_proj` input, q/k/v/logits/probs (plain multi-head attention),
      `visual/proj`, `text/text_projection`, embeddings and LayerNorm inputs.
  Its activation ranges are FQ-ViT's, not widened to hold 0 (`include_zero=False`).

  The public code has no runnable ResNet path, so `official` refuses a ResNet image tower
  (`OFFICIAL_RESNET_ERROR`). Read from its `models/clip/model.py` (HEAD bcd6a87): `main.py`
  accepts RN50..RN50x64, but `ModifiedResNet` builds its `Bottleneck`s and `AttentionPool2d`
  without `cfg` (`AttributeError` at construction), the pool's projections are built
  bias-free so OpenAI's checkpoint cannot load strictly, its multi-head attention calls
  `linear`/`softmax`, which model.py never imports, and OMSE on 4-D conv activations raises
  `IndexError`. What it *builds* differs from both presets: conv kernels int{b} per channel,
  activations quantized at each conv's *output* (before BatchNorm; no QAct on the
  downsample conv, none on inputs), the pool's q/k/v/c projection kernels left float while
  their inputs, q, k, v and the probabilities are uint{b} per tensor, and an 8-bit text tower.

For ResNets the `w{W}a{A}[attn{S}]` presets quantize every conv kernel and conv input (the
stem's three, each `Bottleneck`'s conv1-3 and shortcut `downsample_0`) and the attention pool
like a ViT block (`attnpool/{q,k,v,c}_proj` kernels and inputs, `attnpool/{q,k,v,logits,
probs}`); BatchNorm stays float after the quantized conv unless `quant.fold_batchnorm`.

Neither preset quantizes LayerNorm inputs (`norm` sites) or uses the log2 quantizer for
the probabilities; rules for both can be added, e.g.
`Rule(kind="norm", pattern=".", spec=act_spec(8, observer="ptf", per_channel=True))`
and `Rule(kind="attn", pattern="/probs$", spec=act_spec(4, observer="log2"))`.
  So its "4-bit" result is close to a W8A8 model; `w4a4attn8` is the true 4-bit one.
"""

import dataclasses
import re

from p4q_jax.quant import primitives

KINDS = ("weight", "input", "attn", "norm")
OFFICIAL_RESNET_ERROR = (
    "quant.config='official' is the public P4Q code's ViT quantization; its ResNet path does "
    "not run (ModifiedResNet is built without its quantization config and fails, see "
    "p4q_jax/quant/qconfig.py), so there is no official ResNet recipe to reproduce: use "
    "w{W}a{A}[attn{S}], e.g. w8a8 or w4a4attn8")
OBSERVERS = ("minmax", "ema", "percentile", "omse", "ptf", "log2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one site is quantized. `per_channel` means along the last axis (the output
    channel of a kernel, the feature channel of an activation). `include_zero`: an
    asymmetric range is widened to hold 0 before its scale and zero point are derived
    (see `observers.range_qparams`); False is FQ-ViT's formula, which the `official`
    preset keeps."""

    bits: int
    signed: bool
    symmetric: bool
    per_channel: bool
    observer: str
    include_zero: bool = True

    def __post_init__(self):
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer {self.observer!r} unknown; expected one of {OBSERVERS}")
        primitives.IntFormat(bits=self.bits, signed=self.signed)  # validates bits

    @property
    def fmt(self) -> primitives.IntFormat:
        return primitives.IntFormat(bits=self.bits, signed=self.signed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    kind: str
    pattern: str
    spec: QuantSpec | None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rule kind {self.kind!r} unknown; expected one of {KINDS}")
        re.compile(self.pattern)


def weight_spec(bits, *, observer="minmax"):
    return QuantSpec(bits=bits, signed=True, symmetric=True, per_channel=True, observer=observer)


def act_spec(bits, *, observer="omse", per_channel=False, include_zero=True):
    return QuantSpec(bits=bits, signed=False, symmetric=False, per_channel=per_channel,
                     observer=observer, include_zero=include_zero)


TOWERS = ("visual", "text")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QConfig:
    """Ordered site rules; `towers` limits quantization to some CLIP towers (default both;
    sites outside CLIP's towers, such as P4Q's adapter, are decided by the rules alone)."""

    name: str
    rules: tuple[Rule, ...]
    towers: tuple[str, ...] = TOWERS

    def __post_init__(self):
        unknown = set(self.towers) - set(TOWERS)
        if unknown:
            raise ValueError(f"towers {sorted(unknown)} unknown; expected a subset of {TOWERS}")

    def spec(self, kind: str, site: str) -> QuantSpec | None:
        """The spec of a site, or None when it stays in float."""
        tower = site.split("/", 1)[0]
        if tower in TOWERS and tower not in self.towers:
            return None
        for rule in self.rules:
            if rule.kind == kind and re.search(rule.pattern, site):
                return rule.spec
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QConfig":
        rules = tuple(Rule(kind=r["kind"], pattern=r["pattern"],
                           spec=None if r["spec"] is None else QuantSpec(**r["spec"]))
                      for r in d["rules"])
        return cls(name=d["name"], rules=rules, towers=tuple(d["towers"]))

    @classmethod
    def parse(cls, name: str) -> "QConfig":
        """A preset by name: `official`, or `w{W}a{A}[attn{S}]` (bits 2..8)."""
        if name == "official":
            return official()
        m = re.fullmatch(r"w(\d+)a(\d+)(?:attn(\d+))?", name)
        if not m:
            raise ValueError(f"unknown quantization config {name!r}; expected 'official' or "
                             "'w{W}a{A}[attn{S}]' such as 'w8a8' or 'w4a4attn8'")
        w, a = int(m.group(1)), int(m.group(2))
        return paper(weight_bits=w, act_bits=a,
                     attn_bits=int(m.group(3)) if m.group(3) else a, name=name)


def paper(*, weight_bits, act_bits, attn_bits, name=None):
    """The paper's recipe: a true low-bit model in both towers (see module docstring)."""
    return QConfig(
        name=name or f"w{weight_bits}a{act_bits}attn{attn_bits}",
        rules=(
            Rule(kind="weight", pattern=".", spec=weight_spec(weight_bits)),
            Rule(kind="input", pattern=".", spec=act_spec(act_bits)),
            Rule(kind="attn", pattern="/probs$", spec=act_spec(attn_bits, observer="minmax")),
            Rule(kind="attn", pattern=".", spec=act_spec(attn_bits)),
        ),
    )


def official():
    """The public P4Q code's "4-4-8" quantization of CLIP ViT (see module docstring)."""
    blocks = r"/resblocks_\d+/(attn/(in_proj|out_proj)|mlp/(c_fc|c_proj))$"
    block_inputs = r"/resblocks_\d+/(attn/in_proj|mlp/(c_fc|c_proj))$"
    return QConfig(
        name="official",
        rules=(
            Rule(kind="weight", pattern="^visual/conv1$", spec=weight_spec(4)),
            Rule(kind="input", pattern="^visual/conv1$",
                 spec=act_spec(4, per_channel=True, include_zero=False)),
            Rule(kind="weight", pattern=blocks, spec=weight_spec(8)),
            Rule(kind="input", pattern=block_inputs,
                 spec=act_spec(8, per_channel=True, include_zero=False)),
        ),
    )
