"""Which approach runs on which backbone in which scenario: read off the registries' declarations.

A backbone declares at registration (`BACKBONES.register(..., modalities=..., provides=...)`) the
modalities it encodes and what it offers a method:

    tokens         a `TokenEncoder` (mmcl/backbones/tokens.py): a method can run its layers itself and
                   read its output tokens (DyTox's task attention)
    insert         extra tokens between its [CLS] and the content (L2P's prompts)
    prefix         its self-attention takes prefix keys and values (CODA-Prompt, DualPrompt)
    adapter_sites  bottleneck adapters a method can replace by its own plug-ins (HAT, CTR)

and `dual` declares `towers`: it offers, per modality, what its default tower offers.
An approach declares (class attributes of `Approach`) its `scenarios`, its `modalities`, the
capabilities it `requires`, how it uses a backbone with towers (`tower_use`: "whole" backbone, "each"
tower, or the "text" tower only), and `why_not`: for a scenario or modality it refuses, the reason.

A cell is `no` (with its reason) when the declarations rule it out, `tested` when it is in
`SMOKE_CELLS` — tests/test_compat.py runs every one of them on a tiny sequence — and `untested`
otherwise: allowed by the declarations, but no fast test shows it runs. `markdown()` renders
docs/compat.md (scripts/render_docs.py writes it; its check fails when the page is stale).
"""
from __future__ import annotations

from dataclasses import dataclass

SCENARIO_NAMES = ("til", "dil", "cil", "online")
CAPABILITIES = {
    "tokens": "a transformer encoder whose layers a method runs itself (vit, convit, bert*)",
    "insert": "extra tokens after [CLS] (vit, vit_adapter, bert*)",
    "prefix": "prompts inside self-attention (vit, vit_adapter, bert*)",
    "adapter_sites": "adapters to mask (bert_adapter, vit_adapter)",
}


@dataclass(frozen=True)
class Cell:
    backbone: str
    approach: str
    scenario: str


def backbone_names() -> list[str]:
    from mmcl.backbones import BACKBONES

    return BACKBONES.names()


def approach_names() -> list[str]:
    from mmcl.approaches import APPROACHES

    return APPROACHES.names()


def backbone_declaration(name: str) -> tuple[tuple[str, ...], dict[str, frozenset[str]]]:
    """(modalities, what it provides per modality) of a registered backbone; towers resolved to their defaults."""
    from mmcl.backbones import BACKBONES

    factory = BACKBONES.get(name)
    modalities = tuple(getattr(factory, "modalities", ()))
    if not getattr(factory, "towers", False):
        provides = frozenset(getattr(factory, "provides", ()))
        return modalities, {m: provides for m in modalities}
    defaults = factory.Options()
    tower_names = {"text": defaults.text_backbone, "image": defaults.vision_backbone}
    per_tower = {m: backbone_declaration(tower_names[m])[1][m] for m in modalities}
    return modalities, per_tower


def verdict(backbone: str, approach: str, scenario: str) -> str | None:
    """None when the declarations allow the cell, else why not."""
    from mmcl.approaches import APPROACHES
    from mmcl.backbones import BACKBONES

    cls = APPROACHES.get(approach)
    why = dict(getattr(cls, "why_not", {}))
    if scenario not in cls.scenarios:
        return why.get(scenario, f"{approach} is a method for {', '.join(cls.scenarios)}")
    modalities, provides = backbone_declaration(backbone)
    towered = bool(getattr(BACKBONES.get(backbone), "towers", False))
    missing = [m for m in modalities if m not in cls.modalities]
    if missing:  # (on `dual`: its sequences mix the modalities)
        return why.get(missing[0], f"{approach} handles {', '.join(cls.modalities)}, not {', '.join(missing)}")
    requires = set(getattr(cls, "requires", ()))
    if not requires:
        return None
    use = getattr(cls, "tower_use", "whole")
    if towered and use in ("whole", "none"):
        return why.get("towers", f"needs {', '.join(sorted(requires))} of the whole backbone, which `dual` has "
                                 f"only per tower")
    checked = [use] if towered and use != "each" else list(modalities)
    lacking = sorted({c for m in checked for c in requires if c not in provides.get(m, ())})
    if lacking:
        return "needs " + "; ".join(CAPABILITIES.get(c, c) for c in lacking)
    return None


def allowed_cells() -> list[Cell]:
    return [Cell(b, a, s) for a in approach_names() for b in backbone_names() for s in SCENARIO_NAMES
            if verdict(b, a, s) is None]


def smoke_cells() -> list[Cell]:
    """Every cell a fast test runs (tests/test_compat.py): for each approach, every backbone it allows (in one
    scenario, rotating through its scenarios so that each gets backbones) and every scenario it allows on its
    first backbone."""
    allowed = allowed_cells()
    chosen: list[Cell] = []
    for a in approach_names():
        mine = [c for c in allowed if c.approach == a]
        if not mine:
            continue
        backbones = sorted({c.backbone for c in mine}, key=backbone_names().index)
        scenarios = [s for s in SCENARIO_NAMES if any(c.scenario == s for c in mine)]
        first = backbones[0]
        chosen += [Cell(first, a, s) for s in scenarios if Cell(first, a, s) in mine]
        for i, b in enumerate(backbones[1:]):
            options = [s for s in scenarios if Cell(b, a, s) in mine]
            chosen.append(Cell(b, a, options[(i + 1) % len(options)]))
    return sorted(set(chosen), key=lambda c: (c.approach, c.backbone, SCENARIO_NAMES.index(c.scenario)))


def matrix() -> dict[Cell, str]:
    """Every cell: 'tested', 'untested' or the reason it is not possible."""
    tested = set(smoke_cells())
    out = {}
    for a in approach_names():
        for b in backbone_names():
            for s in SCENARIO_NAMES:
                why = verdict(b, a, s)
                c = Cell(b, a, s)
                out[c] = why if why is not None else ("tested" if c in tested else "untested")
    return out


MARK = {"tested": "✓", "untested": "·"}


def markdown(cells: dict[Cell, str] | None = None) -> str:
    cells = matrix() if cells is None else cells
    backbones, approaches = backbone_names(), approach_names()
    reasons: dict[str, int] = {}

    def cell_text(a: str, b: str) -> str:
        parts = []
        for s in SCENARIO_NAMES:
            v = cells[Cell(b, a, s)]
            if v in MARK:
                parts.append(f"{s.upper()}{MARK[v]}")
            elif not v.startswith(f"{a} is a method for"):
                parts.append(f"{s.upper()}✗{reasons.setdefault(v, len(reasons) + 1)}")
        return " ".join(parts) or "—"

    lines = ["| approach | " + " | ".join(f"`{b}`" for b in backbones) + " |",
             "|---" * (len(backbones) + 1) + "|"]
    for a in approaches:
        lines.append(f"| `{a}` | " + " | ".join(cell_text(a, b) for b in backbones) + " |")
    counts = {k: sum(v == k for v in cells.values()) for k in ("tested", "untested")}
    lines += ["", f"{counts['tested']} cells tested, {counts['untested']} allowed but untested, "
              f"{len(cells) - sum(counts.values())} not possible by design (scenarios an approach is not for "
              f"are left out of the cells).", ""]
    lines += [f"{n}. {why}" for why, n in reasons.items()]
    return "\n".join(lines) + "\n"
