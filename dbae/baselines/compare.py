"""``dbae bench compare``: the paper's Table 5 (inference time) and Table 2 (tractable
reconstruction) measured on this machine, for DBAE and the baselines at one preset and batch.

Per method and setting, three timed operations, each synchronised, after warm-up
(:func:`dbae.export.latency.time_calls`), reported as median and p95 milliseconds:

- ``infer``: images -> (z, x_T). DBAE: ``z = Enc(x)``, ``x_T = Dec(z)`` (one encoder and one
  decoder pass, 0 U-Net NFE). DiffAE / PDAE: ``z = Enc(x)`` then DDIM inversion of x under
  z (``inversion_steps`` NFE).
- ``decode``: (z, x_T) -> images (DBAE: its bridge sampler at ``decode NFE``; DiffAE/PDAE:
  deterministic DDIM at ``decode_steps``).
- ``total``: both, timed end to end as one call.

NFE counts U-Net evaluations as returned by each method's own calls (never assumed); the one
encoder pass (and DBAE's one endpoint-decoder pass) are reported apart, as in Table 5.

Settings: ``authors``: the step counts each method's authors use (DiffAE: 250-step inversion,
20 and 100-step decoding; PDAE: 1000/500/100-step inversion, 100-step decoding; DBAE: its
decode NFE); ``equal-nfe``: every method gets DBAE's total NFE (baselines split it between
inversion and decoding, half each, the remainder to decoding).

Quality (Table 2's "tractable" block): reconstruct built-in shapes test images with one
encoder pass only: DBAE as usual, DiffAE / PDAE decoding from a random x_T ~ N(0, I) at the
same NFE; MSE / PSNR / SSIM on [0, 1] images (:func:`dbae.metrics.image.summarize`).

Methods are pluggable: :data:`METHODS` maps a name to a :class:`MethodSpec` (how to build the
model from a preset with random weights, how to load a checkpoint, the authors' step counts);
:func:`register_method` adds one. PDAE is registered when :mod:`dbae.baselines.pdae` imports
and offers the DiffAE-like API (``encode``, ``infer_x_T``, ``decode``); otherwise it is
listed in :func:`unavailable_methods` with the reason, and skipped with a note.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..plotting import pyplot

Tensor = torch.Tensor

SETTINGS = ("authors", "equal-nfe")
OPS = ("infer", "decode", "total")

#: the paper's Table 5 (their GPU, their 256/128-px models): NFE and ms to infer x_T
PAPER_TABLE5 = {
    "PDAE": {"enc": 1, "dec": 500, "infer_nfe": 500, "ms": 688.0},
    "DiffAE": {"enc": 1, "dec": None, "infer_nfe": 250, "ms": 265.0},
    "DBAE": {"enc": 1, "dec": 1, "infer_nfe": 0, "ms": 0.31},
}


# ----------------------------------------------------------------------------- adapters
class Adapter:
    """One loaded method behind a uniform interface. ``infer_steps`` / ``decode_steps`` are
    step counts (DBAE: ``decode_steps`` is its NFE budget, ``infer_steps`` must be 0)."""

    name: str
    model: torch.nn.Module
    source: str
    image_size: int
    image_channels: int

    def check(self, infer_steps: int, decode_steps: int) -> None:
        raise NotImplementedError

    def split(self, nfe: int) -> tuple[int, int]:
        """(infer_steps, decode_steps) giving ``nfe`` NFE in total."""
        raise NotImplementedError

    def infer(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor, int]:
        """(z, x_T, NFE)."""
        raise NotImplementedError

    def dec_psi_passes(self, infer_nfe: int) -> int:
        """Evaluations of a z-decoder network while inferring x_T (Table 5's Dec_psi column)."""
        return 0

    def network_evals(self, nfe: int) -> int:
        """Forward passes of all denoising networks behind ``nfe`` sampler steps."""
        return nfe

    def decode(self, z: Tensor, x_T: Tensor | None, steps: int, generator: torch.Generator | None = None
               ) -> tuple[Tensor, int]:  # fmt: skip
        """(images in [-1, 1], NFE); ``x_T=None``: the tractable start (DBAE: Dec(z); the
        baselines: x_T ~ N(0, I) from ``generator``)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        return self.model.encode(x)


class DBAEAdapter(Adapter):
    def __init__(self, model: torch.nn.Module, source: str, sampler: str = "euler") -> None:
        self.name, self.model, self.source, self.sampler = "dbae", model, source, sampler
        self.image_size, self.image_channels = model.config.image_size, model.config.image_channels

    def check(self, infer_steps: int, decode_steps: int) -> None:
        from ..sampling import nfe_for

        if infer_steps != 0:
            raise ConfigError(f"dbae infers x_T = Dec(z) with no U-Net evaluation; inversion steps must be 0, "
                              f"got {infer_steps}")  # fmt: skip
        least = nfe_for(1, self.sampler, 0.0)
        if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < least:
            raise ConfigError(f"dbae decode NFE must be an integer >= {least} with sampler {self.sampler!r}, "
                              f"got {decode_steps!r}")  # fmt: skip

    def split(self, nfe: int) -> tuple[int, int]:
        return 0, nfe

    def dec_psi_passes(self, infer_nfe: int) -> int:
        return 1  # x_T = Dec_psi(z)

    def infer(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor, int]:
        z = self.model.encode(x)
        return z, self.model.endpoint(z), 0

    def decode(self, z, x_T, steps, generator=None):  # type: ignore[override]
        out = self.model.decode(z, steps, sampler=self.sampler, x_T=x_T, generator=generator)
        return out.images, out.nfe


class InversionAdapter(Adapter):
    """DiffAE-like methods: ``encode(x)``, ``infer_x_T(x, z, steps) -> (x_T, nfe)``,
    ``decode(z, x_T=None, steps) -> (images, x_T, nfe)``; steps bounded by ``schedule.timesteps``."""

    def __init__(self, name: str, model: torch.nn.Module, source: str, *, evals_per_step: int = 1,
                 dec_psi_per_step: int = 0) -> None:  # fmt: skip
        self.name, self.model, self.source = name, model, source
        self.evals_per_step, self.dec_psi_per_step = evals_per_step, dec_psi_per_step
        cfg = model.config
        self.image_size, self.image_channels = cfg.image_size, cfg.image_channels
        schedule = getattr(model, "schedule", None)
        self.max_steps: int | None = getattr(schedule, "timesteps", None)
        if self.max_steps is None and hasattr(cfg, "schedule"):
            self.max_steps = getattr(cfg.schedule, "timesteps", None)

    def _check(self, steps: int, what: str, invert: bool = False) -> None:
        hi = "" if self.max_steps is None else f", at most {self.max_steps} (this model's schedule)"
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or (
            self.max_steps is not None and steps > self.max_steps
        ):
            raise ConfigError(f"{self.name} {what} must be an integer >= 1{hi}, got {steps!r}")
        plan = getattr(self.model, "ddim_steps", None)
        if plan is not None:  # the method's authors' grid must be able to make that count
            plan(steps, what, invert=invert)

    def check(self, infer_steps: int, decode_steps: int) -> None:
        """Both step counts; ``infer_steps`` 0: no inversion (decoding from a random x_T)."""
        if infer_steps != 0:
            self._check(infer_steps, "inversion steps", invert=True)
        self._check(decode_steps, "decode steps")

    def split(self, nfe: int) -> tuple[int, int]:
        """The most even split of ``nfe`` into inversion and decode steps that the method's
        DDIM grid can make (DiffAE's spacing takes only some counts)."""
        if nfe < 2:
            raise ConfigError(f"{self.name} needs an equal NFE >= 2 (>= 1 to invert, >= 1 to decode), got {nfe}")
        for inv in sorted(range(1, nfe), key=lambda a: (abs(nfe - 2 * a), a)):
            try:
                self.check(inv, nfe - inv)
            except ConfigError:
                continue
            return inv, nfe - inv
        raise ConfigError(f"{self.name}'s DDIM grid cannot split an equal NFE of {nfe} into inversion and decode "
                          "steps; choose another --equal-nfe")

    def dec_psi_passes(self, infer_nfe: int) -> int:
        return self.dec_psi_per_step * infer_nfe

    def network_evals(self, nfe: int) -> int:
        return self.evals_per_step * nfe

    def infer(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor, int]:
        z = self.model.encode(x)
        out = self.model.infer_x_T(x, z, steps)
        return z, out.x_T, int(out.nfe)

    def decode(self, z, x_T, steps, generator=None):  # type: ignore[override]
        out = self.model.decode(z, x_T, steps, generator=generator)
        return out.images, int(out.nfe)


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class MethodSpec:
    """``build(preset, device)`` and ``load(path, device)`` return an :class:`Adapter`;
    ``authors``: the (inversion steps, decode steps) settings its authors use."""

    name: str
    label: str
    build: Callable[..., Adapter]
    load: Callable[..., Adapter] | None
    authors: tuple[tuple[int, int], ...]
    note: str = ""


METHODS: dict[str, MethodSpec] = {}
_UNAVAILABLE: dict[str, str] = {}


def register_method(spec: MethodSpec) -> None:
    METHODS[spec.name] = spec
    _UNAVAILABLE.pop(spec.name, None)


def unavailable_methods() -> dict[str, str]:
    """Known methods that could not be registered, with the reason."""
    _discover()
    return dict(_UNAVAILABLE)


def method_names() -> list[str]:
    _discover()
    return list(METHODS)


def _dbae_build(preset: str, device: torch.device, *, sampler: str = "euler", dbae_nfe: int = 10) -> Adapter:
    from ..config import get_preset
    from ..model import DBAE

    torch.manual_seed(0)
    model = DBAE(get_preset(preset).model).to(device).eval()
    return DBAEAdapter(model, f"DBAE {preset} (random weights)", sampler)


def _dbae_load(path: str, device: torch.device, *, sampler: str = "euler", **_: Any) -> Adapter:
    from ..inference import load_model

    loaded = load_model(path, device=device)
    return DBAEAdapter(loaded.model, f"DBAE {loaded.preset.name} checkpoint {loaded.path} (step {loaded.step})",
                       sampler)  # fmt: skip


def _diffae_build(preset: str, device: torch.device, **_: Any) -> Adapter:
    from .config import diffae_preset
    from .diffae import DiffAE

    torch.manual_seed(0)
    return InversionAdapter("diffae", DiffAE(diffae_preset(preset).model).to(device).eval(),
                            f"DiffAE {preset} (random weights)")  # fmt: skip


def _diffae_load(path: str, device: torch.device, **_: Any) -> Adapter:
    from .train import load_diffae

    model, preset = load_diffae(path, device=device)
    return InversionAdapter("diffae", model, f"DiffAE {preset.name} checkpoint {path}")


register_method(MethodSpec("dbae", "DBAE", _dbae_build, _dbae_load, authors=((0, 10),),
                           note="x_T = Dec(z): one decoder pass"))  # fmt: skip
register_method(MethodSpec("diffae", "DiffAE", _diffae_build, _diffae_load, authors=((250, 20), (250, 100)),
                           note="DDIM inversion 250 steps; decode 20 or 100 steps"))  # fmt: skip

_DISCOVERED = False


def _pdae_spec(mod: Any) -> MethodSpec:
    """PDAE's spec from :mod:`dbae.baselines.pdae`, or ValueError naming what is missing."""
    cls = getattr(mod, "PDAE", None)
    if cls is None:
        raise ValueError("dbae.baselines.pdae has no class PDAE")
    for meth in ("encode", "infer_x_T", "decode"):
        if not callable(getattr(cls, meth, None)):
            raise ValueError(f"dbae.baselines.pdae.PDAE has no method {meth}()")
    preset_fn = _first_attr(mod, "pdae_preset", ("dbae.baselines.pdae_config", "dbae.baselines.config"))
    config_cls = getattr(mod, "PDAEConfig", None)
    if preset_fn is None and not hasattr(config_cls, "from_model_config"):
        raise ValueError("dbae.baselines.pdae offers neither pdae_preset(name) nor PDAEConfig.from_model_config")

    def build(preset: str, device: torch.device, **_: Any) -> Adapter:
        if preset_fn is not None:
            config = preset_fn(preset).model
        else:
            from ..config import get_preset

            config = config_cls.from_model_config(get_preset(preset).model)
        torch.manual_seed(0)
        return _pdae_adapter(cls(config).to(device).eval(), f"PDAE {preset} (random weights)")

    loader = _first_attr(mod, "load_pdae", ("dbae.baselines.pdae_train", "dbae.baselines.train"))

    def load(path: str, device: torch.device, **_: Any) -> Adapter:
        out = loader(path, device=device)
        model = out[0] if isinstance(out, tuple) else getattr(out, "model", out)
        return _pdae_adapter(model.to(device).eval(), f"PDAE checkpoint {path}")

    return MethodSpec("pdae", "PDAE", build, load if loader is not None else None, authors=((1000, 100), (500, 100), (100, 100)),
                      note="DDIM inversion 1000/500/100 steps; decode 100 steps")  # fmt: skip


def _first_attr(mod: Any, attr: str, modules: Sequence[str]) -> Any:
    """``mod.attr``, else the first of ``modules`` that imports and has ``attr``, else None."""
    found = getattr(mod, attr, None)
    for name in modules:
        if found is not None:
            break
        try:
            found = getattr(importlib.import_module(name), attr, None)
        except Exception:  # noqa: BLE001  (an optional, possibly half-written module)
            found = None
    return found


def _pdae_adapter(model: torch.nn.Module, source: str) -> Adapter:
    """PDAE: every sampler step evaluates the frozen eps_theta and the gradient estimator
    G_psi (PDAE's "decoder"), as in Table 5 (Dec_psi 500, score 500)."""
    return InversionAdapter("pdae", model, source, evals_per_step=2, dec_psi_per_step=1)


def _discover() -> None:
    """Register PDAE if :mod:`dbae.baselines.pdae` imports and has the expected API."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    if "pdae" in METHODS:
        return
    try:
        mod = importlib.import_module("dbae.baselines.pdae")
        register_method(_pdae_spec(mod))
    except ModuleNotFoundError as exc:
        if exc.name not in ("dbae.baselines.pdae",):
            _UNAVAILABLE["pdae"] = f"dbae.baselines.pdae failed to import: {exc}"
        else:
            _UNAVAILABLE["pdae"] = "dbae.baselines.pdae is not there yet"
    except Exception as exc:  # a half-written or incompatible module must not break the benchmark
        _UNAVAILABLE["pdae"] = f"dbae.baselines.pdae is not usable: {type(exc).__name__}: {exc}"


def resolve_methods(names: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(usable names in order, notes for skipped ones); ConfigError for unknown names."""
    _discover()
    known = [*METHODS, *[n for n in _UNAVAILABLE if n not in METHODS]]
    names = list(dict.fromkeys(names or known))
    unknown = [n for n in names if n not in METHODS and n not in _UNAVAILABLE]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(known)}")
    notes = [f"skipping {n}: {_UNAVAILABLE[n]}" for n in names if n not in METHODS]
    return [n for n in names if n in METHODS], notes


# ----------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class CompareRow:
    method: str
    setting: str  # authors | equal-nfe
    batch: int
    inversion_steps: int
    decode_steps: int
    infer_nfe: int  # U-Net evaluations to infer x_T
    decode_nfe: int
    total_nfe: int
    encoder_passes: int
    dec_psi_passes: int  # z-decoder evaluations to infer x_T (DBAE: Dec_psi once; PDAE: G_psi per step)
    network_evals: int  # forward passes of all denoising networks in total (PDAE: 2 per step)
    infer_median_ms: float
    infer_p95_ms: float
    decode_median_ms: float
    decode_p95_ms: float
    total_median_ms: float
    total_p95_ms: float
    runs: int


@dataclass
class Plan:
    """What to run: methods -> list of (setting, inversion steps, decode steps)."""

    rows: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    equal_nfe: int | None = None


def plan_settings(
    adapters: dict[str, Adapter],
    *,
    settings: Sequence[str],
    dbae_nfe: int,
    equal_nfe: int | None = None,
    inversion_steps: Sequence[int] | None = None,
    decode_steps: Sequence[int] | None = None,
) -> Plan:
    """Every (setting, inversion steps, decode steps) per method, all checked up front
    (ConfigError on a step count the method or its schedule does not allow).
    ``inversion_steps`` / ``decode_steps`` replace the baselines' authors' step counts
    (their cross product); DBAE's authors setting is ``dbae_nfe``."""
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ConfigError(f"unknown setting(s) {bad}; choose from {', '.join(SETTINGS)}")
    plan = Plan()
    if "equal-nfe" in settings:
        if equal_nfe is None:
            equal_nfe = dbae_total_nfe(adapters.get("dbae"), dbae_nfe)
        plan.equal_nfe = equal_nfe
    for name, ad in adapters.items():
        todo: list[tuple[str, int, int]] = []
        if "authors" in settings:
            if name == "dbae":
                pairs: list[tuple[int, int]] = [(0, dbae_nfe)]
            elif inversion_steps or decode_steps:
                inv = list(inversion_steps or sorted({a for a, _ in METHODS[name].authors}, reverse=True))
                dec = list(decode_steps or sorted({b for _, b in METHODS[name].authors}))
                pairs = [(a, b) for a in inv for b in dec]
            else:
                pairs = list(METHODS[name].authors)
            todo += [("authors", a, b) for a, b in pairs]
        if "equal-nfe" in settings:
            todo.append(("equal-nfe", *ad.split(plan.equal_nfe)))
        for _, a, b in todo:
            ad.check(a, b)
        plan.rows[name] = todo
    return plan


def dbae_total_nfe(adapter: Adapter | None, nfe: int, sampler: str = "euler") -> int:
    """DBAE's exact NFE at budget ``nfe`` (what its sampler really spends)."""
    from ..sampling import nfe_for, steps_for_nfe

    sampler = getattr(adapter, "sampler", sampler)
    try:
        return nfe_for(steps_for_nfe(nfe, sampler, 0.0), sampler, 0.0)
    except ValueError as exc:
        raise ConfigError(f"dbae decode NFE: {exc}") from None


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ConfigError(f"precision must be fp32 or bf16, got {precision!r}")


def bench_compare(
    adapters: dict[str, Adapter],
    plan: Plan,
    *,
    batch: int,
    device: torch.device,
    precision: str = "fp32",
    warmup: int = 2,
    runs: int = 10,
    seed: int = 0,
    report: Callable[[CompareRow], None] | None = None,
) -> list[CompareRow]:
    """Time infer / decode / total for every planned row (identical settings of one method
    are measured once and reused)."""
    from dbae.export.latency import percentile, time_calls

    if batch < 1 or runs < 1 or warmup < 0:
        raise ConfigError(f"need batch >= 1, runs >= 1, warmup >= 0; got {batch}, {runs}, {warmup}")
    sync = _sync(device)
    rows: list[CompareRow] = []
    for name, todo in plan.rows.items():
        ad = adapters[name]
        g = torch.Generator().manual_seed(seed + batch)
        x = (torch.rand((batch, ad.image_channels, ad.image_size, ad.image_size), generator=g) * 2 - 1).to(device)
        cache: dict[tuple[int, int], dict[str, Any]] = {}
        for setting, inv, dec in todo:
            if (inv, dec) not in cache:
                with torch.no_grad(), autocast(device, precision):
                    z, x_T, inv_nfe = ad.infer(x, inv)
                    _, dec_nfe = ad.decode(z, x_T, dec)

                    def total(inv=inv, dec=dec):
                        zz, xx, _ = ad.infer(x, inv)
                        return ad.decode(zz, xx, dec)

                    t_inf = time_calls(lambda: ad.infer(x, inv), sync, warmup=warmup, runs=runs)
                    t_dec = time_calls(lambda: ad.decode(z, x_T, dec), sync, warmup=warmup, runs=runs)
                    t_tot = time_calls(total, sync, warmup=warmup, runs=runs)
                cache[(inv, dec)] = dict(
                    infer_nfe=inv_nfe, decode_nfe=dec_nfe, total_nfe=inv_nfe + dec_nfe,
                    **{f"{op}_median_ms": statistics.median(t) for op, t in zip(OPS, (t_inf, t_dec, t_tot))},
                    **{f"{op}_p95_ms": percentile(t, 95) for op, t in zip(OPS, (t_inf, t_dec, t_tot))},
                )  # fmt: skip
            c = cache[(inv, dec)]
            row = CompareRow(method=name, setting=setting, batch=batch, inversion_steps=inv, decode_steps=dec,
                             encoder_passes=1, dec_psi_passes=ad.dec_psi_passes(c["infer_nfe"]),
                             network_evals=ad.network_evals(c["total_nfe"]), runs=runs, **c)  # fmt: skip
            rows.append(row)
            if report is not None:
                report(row)
    return rows


# ----------------------------------------------------------------------------- quality
@torch.no_grad()
def quality(
    adapters: dict[str, Adapter],
    *,
    images: int,
    nfe: int,
    batch: int,
    device: torch.device,
    precision: str = "fp32",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Table 2's tractable block: ``images`` shapes test images (seed ``seed``) reconstructed
    from one encoder pass: DBAE through x_T = Dec(z), DiffAE / PDAE from random x_T, each
    decoded at ``nfe`` NFE (baselines: ``nfe`` DDIM steps). MSE / PSNR / SSIM on [0, 1]."""
    from ..data.shapes import ShapesDataset
    from ..metrics.image import summarize

    if images < 1:
        raise ConfigError(f"--quality needs >= 1 image, got {images}")
    sizes = {(ad.image_channels, ad.image_size) for ad in adapters.values()}
    if len(sizes) != 1:
        raise ConfigError(f"the methods disagree on the image shape {sorted(sizes)}: use one preset")
    channels, size = sizes.pop()
    if channels != 3:
        raise ConfigError(f"--quality uses the RGB shapes dataset; these models take {channels} channels")
    data = ShapesDataset(size, length=images, seed=seed, split="test")
    x_all = ShapesDataset.render(data.factors_at(range(images)), size)
    out = []
    for name, ad in adapters.items():
        ad.check(0, nfe)  # one encoder pass only: no inversion
        g = torch.Generator(device=device).manual_seed(seed)
        recs, used = [], 0
        for i in range(0, images, batch):
            x = x_all[i : i + batch].to(device)
            with autocast(device, precision):
                z = ad.encode(x)
                rec, used = ad.decode(z, None, nfe, generator=g)
            recs.append(rec.float().cpu())
        stats = summarize((torch.cat(recs) + 1) / 2, (x_all + 1) / 2)
        x_T = "Dec(z)" if name == "dbae" else "random N(0, I)"
        out.append({"method": name, "x_T": x_T, "nfe": used, "images": images, **stats})
    return out


# ----------------------------------------------------------------------------- output
HEADER = (f"{'method':7} {'setting':9} {'batch':>5} {'inv':>5} {'dec':>4} {'NFE x_T':>7} {'NFE dec':>7} "
          f"{'NFE tot':>7} {'x_T ms':>10} {'p95':>9} {'decode ms':>10} {'p95':>9} {'total ms':>10} {'p95':>9}")  # fmt: skip


def format_row(r: CompareRow) -> str:
    return (f"{r.method:7} {r.setting:9} {r.batch:5d} {r.inversion_steps:5d} {r.decode_steps:4d} {r.infer_nfe:7d} "
            f"{r.decode_nfe:7d} {r.total_nfe:7d} {r.infer_median_ms:10.3f} {r.infer_p95_ms:9.3f} "
            f"{r.decode_median_ms:10.3f} {r.decode_p95_ms:9.3f} {r.total_median_ms:10.3f} {r.total_p95_ms:9.3f}")  # fmt: skip


def format_table(rows: Sequence[CompareRow]) -> str:
    return "\n".join([HEADER, *map(format_row, rows)])


def format_quality(q: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'method':7} {'x_T':15} {'NFE':>4} {'images':>6} {'MSE':>9} {'PSNR dB':>8} {'SSIM':>7}"]
    for r in q:
        lines.append(f"{r['method']:7} {r['x_T']:15} {r['nfe']:4d} {r['images']:6d} {r['mse']:9.5f} "
                     f"{r['psnr']:8.2f} {r['ssim']:7.4f}")  # fmt: skip
    return "\n".join(lines)


def _label(name: str) -> str:
    spec = METHODS.get(name)
    return spec.label if spec else name


def markdown(rows: Sequence[CompareRow], meta: dict, q: Sequence[dict[str, Any]] | None = None) -> str:
    out = [f"# DBAE vs baselines: inference time (the paper's Table 5) on {meta.get('device', '?')}", "",
           f"Models: {'; '.join(meta.get('models', []))}. Precision {meta.get('precision')}, batch "
           f"{meta.get('batch')}, median / p95 over {meta.get('runs')} runs after {meta.get('warmup')} warm-up.", "",
           "| method | setting | inversion steps | decode steps | Enc passes | Dec_psi passes | NFE infer x_T "
           "| NFE decode | NFE total | network evals | infer x_T ms (median / p95) | decode ms | total ms |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        out.append(f"| {_label(r.method)} | {r.setting} | {r.inversion_steps} | {r.decode_steps} | {r.encoder_passes} "
                   f"| {r.dec_psi_passes} | {r.infer_nfe} | {r.decode_nfe} | {r.total_nfe} | {r.network_evals} "
                   f"| {r.infer_median_ms:.3f} / {r.infer_p95_ms:.3f} | {r.decode_median_ms:.3f} / {r.decode_p95_ms:.3f} "
                   f"| {r.total_median_ms:.3f} / {r.total_p95_ms:.3f} |")  # fmt: skip
    out += ["", "NFE: sampler steps of the denoising network (one PDAE step evaluates both its frozen eps network "
            "and its gradient estimator G_psi, hence 'network evals'); the encoder pass is counted apart. "
            "Dec_psi passes: z-decoder evaluations while inferring x_T (DBAE's endpoint decoder once; PDAE's "
            "G_psi once per inversion step)."]
    out += ["", "Paper, Table 5 (their models and GPU), ms to infer x_T: "
            + ", ".join(f"{k} {v['ms']} ms at NFE {v['infer_nfe']}" for k, v in PAPER_TABLE5.items()) + "."]
    for note in meta.get("notes", []):
        out += ["", f"Note: {note}"]
    if q:
        out += ["", "## Reconstruction with tractable inference (the paper's Table 2 setting)", "",
                f"{q[0]['images']} built-in shapes test images; DiffAE / PDAE decode from a random x_T, DBAE from "
                "x_T = Dec(z). MSE / PSNR / SSIM on [0, 1] images.", "",
                "| method | x_T | NFE | MSE | PSNR (dB) | SSIM |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
        out += [f"| {_label(r['method'])} | {r['x_T']} | {r['nfe']} | {r['mse']:.5f} | {r['psnr']:.2f} | {r['ssim']:.4f} |"
                for r in q]  # fmt: skip
        if meta.get("random_weights"):
            out += ["", "Random weights: these numbers are a smoke check of the pipeline, not a comparison."]
    return "\n".join(out) + "\n"


def write_outputs(rows: Sequence[CompareRow], meta: dict, out: Path, q: Sequence[dict[str, Any]] | None = None
                  ) -> dict[str, Path]:  # fmt: skip
    """compare.json, compare.md and (with matplotlib) compare.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "md": out / "compare.md"}

    def clean(v: Any) -> Any:  # JSON has no inf
        return None if isinstance(v, float) and not math.isfinite(v) else v

    data = {"meta": meta, "rows": [asdict(r) for r in rows],
            "quality": [{k: clean(v) for k, v in r.items()} for r in (q or [])],
            "paper_table5": PAPER_TABLE5}  # fmt: skip
    paths["json"].write_text(json.dumps(data, indent=2))
    paths["md"].write_text(markdown(rows, meta, q))
    if plot(rows, out / "compare.png", title=f"{meta.get('preset', '')} batch {meta.get('batch')}, "
            f"{meta.get('device', '')}, {meta.get('precision', '')}"):  # fmt: skip
        paths["png"] = out / "compare.png"
    return paths


def plot(rows: Sequence[CompareRow], path: Path, title: str = "") -> bool:
    """Grouped bars (infer x_T, decode, total; median with p95 whisker, log scale), one group
    per row. False (nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    seen: dict[tuple, CompareRow] = {}
    for r in rows:
        seen.setdefault((r.method, r.setting, r.inversion_steps, r.decode_steps), r)
    groups = list(seen.values())
    labels = [f"{_label(r.method)} {r.setting}\ninv {r.inversion_steps} / dec {r.decode_steps}" for r in groups]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 4.2))
    width = 0.27
    for j, op in enumerate(OPS):
        med = [getattr(r, f"{op}_median_ms") for r in groups]
        err = [getattr(r, f"{op}_p95_ms") - m for r, m in zip(groups, med)]
        xs = [i + (j - 1) * width for i in range(len(groups))]
        ax.bar(xs, med, width, yerr=[[0] * len(err), err], capsize=2, label="infer x_T" if op == "infer" else op)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, p95)")
    ax.set_xticks(range(len(groups)), labels, fontsize=7)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replace_authors(spec_name: str, authors: Sequence[tuple[int, int]]) -> None:
    """Change a registered method's authors' step counts (for experiments and tests)."""
    METHODS[spec_name] = dataclasses.replace(METHODS[spec_name], authors=tuple(authors))
