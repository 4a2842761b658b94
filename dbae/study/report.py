"""The study's outputs: the claims checked against the measured numbers, a console table,
``paper_claims.json``, ``paper_claims.md`` and PNG plots (reconstruction metrics, a grid of
reconstructions, latency)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..plotting import pyplot
from .config import LABELS

#: the paper's Table 2, tractable block (FFHQ-trained, CelebA-HQ reconstructions): SSIM, LPIPS, MSE
PAPER_TABLE2_TRACTABLE = {
    "DiffAE (random x_T)": {"ssim": 0.677, "lpips": 0.073, "mse": 0.007},
    "PDAE (random x_T)": {"ssim": 0.689, "lpips": 0.098, "mse": 5.01e-3},
    "DBAE": {"ssim": 0.920, "lpips": 0.094, "mse": 4.81e-3},
    "DBAE-d": {"ssim": 0.953, "lpips": 0.072, "mse": 2.49e-3},
}


# ----- claims -----
def _compare_recon(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, list[str]]:
    """(verdict, which metrics favour ``a``) for reconstruction rows a vs b."""
    better = [m for m, a_wins in (("MSE", a["mse"] < b["mse"]), ("PSNR", a["psnr"] > b["psnr"]),
                                  ("SSIM", a["ssim"] > b["ssim"])) if a_wins]  # fmt: skip
    return ("holds" if len(better) == 3 else "fails" if not better else "mixed"), better


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each claim of the paper that the measurements can check, with its verdict ("holds",
    "fails" or "mixed") and the numbers behind it; claims whose methods were not run are left out."""
    rec = {(r["method"], r["setting"]): r for r in results["reconstruction"]}
    lat = {r["method"]: r for r in results["latency"]}
    rep = results.get("representation") or {}
    out: list[dict[str, Any]] = []
    for ours in ("dbae", "dbae-d"):
        for base in ("diffae", "pdae"):
            a, b = rec.get((ours, "tractable")), rec.get((base, "tractable"))
            if a is None or b is None:
                continue
            verdict, better = _compare_recon(a, b)
            out.append({
                "paper": "Table 2", "kind": "reconstruction", "methods": [ours, base], "verdict": verdict,
                "better_on": better, "claim": f"{LABELS[ours]} (tractable: x_T = Dec(z)) reconstructs better than {LABELS[base]} "
                         "from a random x_T (tractable inference only)",
                "numbers": f"MSE {a['mse']:.5f} vs {b['mse']:.5f}, PSNR {a['psnr']:.2f} vs {b['psnr']:.2f} dB, "
                           f"SSIM {a['ssim']:.4f} vs {b['ssim']:.4f}",
            })  # fmt: skip
    if ("dbae", "tractable") in rec and ("dbae-d", "tractable") in rec:
        verdict, better = _compare_recon(rec[("dbae-d", "tractable")], rec[("dbae", "tractable")])
        a, b = rec[("dbae-d", "tractable")], rec[("dbae", "tractable")]
        out.append({"paper": "Table 2", "kind": "reconstruction", "methods": ["dbae-d", "dbae"], "verdict": verdict,
                    "better_on": better, "claim": "DBAE-d (deterministic encoder) reconstructs better than DBAE",
                    "numbers": f"MSE {a['mse']:.5f} vs {b['mse']:.5f}, SSIM {a['ssim']:.4f} vs {b['ssim']:.4f}"})  # fmt: skip
    for base in ("diffae", "pdae"):
        if "dbae" in lat and base in lat:
            a, b = lat["dbae"], lat[base]
            out.append({
                "paper": "Table 5", "kind": "latency", "methods": ["dbae", base], "verdict": "holds" if a["infer_ms"] < b["infer_ms"] else "fails",
                "claim": f"DBAE infers x_T faster than {LABELS[base]} ({b['inversion_steps']}-step DDIM inversion)",
                "numbers": f"{a['infer_ms']:.3f} vs {b['infer_ms']:.3f} ms per image "
                           f"({b['infer_ms'] / max(a['infer_ms'], 1e-12):.0f}x)",
            })  # fmt: skip
    for base in ("dbae-d", "diffae", "pdae"):
        if "dbae" in rep and base in rep:
            a, b = rep["dbae"], rep[base]
            better = [m for m, a_wins in (("mAP", a["map"] > b["map"]),
                                          ("Pearson r", a["mean_pearson_r"] > b["mean_pearson_r"])) if a_wins]  # fmt: skip
            verdict = "holds" if len(better) == 2 else "fails" if not better else "mixed"
            out.append({"paper": "Table 1", "kind": "probe", "methods": ["dbae", base], "verdict": verdict,
                        "better_on": better,
                        "claim": f"DBAE's z is more informative for a linear probe than {LABELS[base]}'s"
                                 + (" (stochastic vs deterministic encoder)" if base == "dbae-d" else ""),
                        "numbers": f"mAP {a['map']:.4f} vs {b['map']:.4f}, mean Pearson r "
                                   f"{a['mean_pearson_r']:.4f} vs {b['mean_pearson_r']:.4f}"})  # fmt: skip
    return out


# ----- text -----
def _f(v: Any, spec: str) -> str:
    """``v`` formatted by ``spec``; "n/a" (padded to the spec's width) when missing or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        digits = spec.split(".")[0].rstrip("df")
        return "n/a".rjust(int(digits) if digits.isdigit() else 0)
    return format(v, spec)


def format_table(results: dict[str, Any]) -> str:
    """The console table: one line per (method, setting)."""
    rep = results.get("representation") or {}
    lat = {r["method"]: r for r in results["latency"]}
    head = (f"{'method':7} {'setting':9} {'x_T':27} {'NFE':>4} {'MSE':>8} {'PSNR':>6} {'SSIM':>6} "
            f"{'mAP':>6} {'r':>6} {'TAD':>6} {'ATTRS':>5} {'enc ms':>7} {'x_T ms':>8} {'dec ms':>8}")  # fmt: skip
    lines = [head]
    for r in results["reconstruction"]:
        p, t = rep.get(r["method"], {}), lat.get(r["method"], {})
        infer = t.get("encode_ms") if r["setting"] == "tractable" and r["method"] in ("diffae", "pdae") else t.get("infer_ms")
        lines.append(
            f"{r['label']:7} {r['setting']:9} {r['x_T']:27} {r['nfe']:4d} {r['mse']:8.5f} {r['psnr']:6.2f} "
            f"{r['ssim']:6.4f} {_f(p.get('map'), '6.4f')} {_f(p.get('mean_pearson_r'), '6.3f')} "
            f"{_f(p.get('tad'), '6.3f')} {_f(p.get('attrs'), '5d')} {_f(t.get('encode_ms'), '7.3f')} "
            f"{_f(infer, '8.3f')} {_f(t.get('decode_ms'), '8.3f')}"
        )  # fmt: skip
    return "\n".join(lines)


def format_claims(results: dict[str, Any]) -> str:
    return "\n".join(f"[{c['verdict']:6}] {c['paper']}: {c['claim']}: {c['numbers']}" for c in results["claims"])


def markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    """``paper_claims.md``: set-up, tables, claims, plots (``plots``: name -> file name)."""
    cfg, meta = results["config"], results["meta"]
    out = ["# Paper claims at small scale: DBAE, DBAE-d, DiffAE, PDAE", "",
           f"Preset `{cfg['preset']}` networks for every method, data `{cfg['dataset']}`, {cfg['steps']} steps "
           f"of batch {results['training'][0]['batch_size'] if results['training'] else '?'} per method (PDAE: "
           f"per stage), seed {cfg['seed']}; {meta['device']}, {meta['threads']} thread(s), torch {meta['torch']}.",
           "", "## Training", "", "| method | steps | batch | training seconds | checkpoint |", "|---|---:|---:|---:|---|"]  # fmt: skip
    out += [f"| {t['label']} | {t['steps']} | {t['batch_size']} | {_f(t['seconds'], '.0f')} | `{t['checkpoint']}` |"
            for t in results["training"]]  # fmt: skip
    out += ["", "Training seconds include the trainers' own evaluation passes; PDAE's cover both stages."]
    shapes = cfg["dataset"] == "shapes"
    out += ["", f"## Reconstruction ({results['reconstruction'][0]['images']} {'held-out' if shapes else 'training'} "
            "images, EMA weights)", ""]  # fmt: skip
    if not shapes:
        out += ["An image folder is one split: these images are the first ones of the training data.", ""]
    out += ["Tractable: one encoder pass only (DBAE: x_T = Dec(z); DiffAE / PDAE: random x_T ~ N(0, I), the paper's "
            "Table 2 tractable block). Inverted: DiffAE / PDAE with x_T from DDIM inversion (not tractable). "
            "MSE / PSNR / SSIM on [0, 1] images.", "",
            "| method | setting | x_T | NFE | MSE | PSNR (dB) | SSIM |", "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    out += [f"| {r['label']} | {r['setting']} | {r['x_T']} | {r['nfe']} | {r['mse']:.5f} | {r['psnr']:.2f} | "
            f"{r['ssim']:.4f} |" for r in results["reconstruction"]]  # fmt: skip
    rep = results.get("representation")
    if rep:
        any_rep = next(iter(rep.values()))
        out += ["", f"## Representation (shapes factors; probe {any_rep['n_train']} train / {any_rep['n_test']} "
                "test latents, TAD on the test latents)", "",
                "mAP: mean average precision of a logistic probe on z for the one-vs-rest shape and colour "
                "attributes; r: mean Pearson r of a linear regression on z for size, x, y, rotation, background. "
                "TAD / ATTRS on binary attributes (continuous factors split at mid-range); no TC penalty was used.",
                "", "| method | z dim | mAP | mean r | TAD | ATTRS |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        out += [f"| {LABELS[m]} | {p['z_dim']} | {p['map']:.4f} | {p['mean_pearson_r']:.4f} | {p['tad']:.4f} | "
                f"{p['attrs']} / {p['tad_attributes']} |" for m, p in rep.items()]  # fmt: skip
    else:
        out += ["", "## Representation", "", "Not measured: the probe and TAD need the shapes factors as labels."]
    out += ["", f"## Latency (ms per image, batch {results['latency'][0]['batch']}, median of "
            f"{cfg['latency_runs']} calls)", "",
            "encode: z = Enc(x). infer x_T: images -> (z, x_T) (DBAE: Enc and Dec; DiffAE / PDAE: Enc and DDIM "
            "inversion). decode: (z, x_T) -> images.", "",
            "| method | inversion steps | decode NFE | encode | infer x_T | decode |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    out += [f"| {r['label']} | {r['inversion_steps']} | {r['decode_nfe']} | {r['encode_ms']:.3f} | "
            f"{r['infer_ms']:.3f} | {r['decode_ms']:.3f} |" for r in results["latency"]]  # fmt: skip
    out += ["", "## Claims", "", "| paper | claim | verdict | numbers |", "|---|---|---|---|"]
    out += [f"| {c['paper']} | {c['claim']} | {c['verdict']} | {c['numbers']} |" for c in results["claims"]]
    if plots:
        out += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()]
    return "\n".join(out) + "\n"


# ----- plots -----
def plot_reconstruction_metrics(results: dict[str, Any], path: Path) -> bool:
    """Bars of MSE, PSNR and SSIM per (method, setting); False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    rows = results["reconstruction"]
    names = [f"{r['label']}\n{'Dec(z)' if r['x_T'] == 'Dec(z)' else r['setting']}" for r in rows]
    colours = ["tab:blue" if r["setting"] == "tractable" else "tab:gray" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 2.4 * len(rows)), 3.6))
    for ax, (key, title) in zip(axes, (("mse", "MSE (lower is better)"), ("psnr", "PSNR dB (higher is better)"),
                                       ("ssim", "SSIM (higher is better)"))):  # fmt: skip
        ax.bar(range(len(rows)), [r[key] for r in rows], color=colours)
        ax.set_xticks(range(len(rows)), names, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Reconstruction of held-out images: blue = tractable inference only, grey = DDIM-inverted x_T",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_reconstruction_grid(inputs: torch.Tensor, rows: Sequence[tuple[str, torch.Tensor]], path: Path) -> bool:
    """One row of images per setting under a row of inputs (images in [-1, 1])."""
    plt = pyplot()
    if plt is None:
        return False
    all_rows = [("input", inputs), *rows]
    n = inputs.shape[0]
    fig, axes = plt.subplots(len(all_rows), n, figsize=(0.9 * n + 1.6, 0.9 * len(all_rows)), squeeze=False)
    for i, (label, images) in enumerate(all_rows):
        for j in range(n):
            ax = axes[i][j]
            img = ((images[j].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_latency(results: dict[str, Any], path: Path) -> bool:
    """Grouped bars (encode, infer x_T, decode) in ms per image, log scale."""
    plt = pyplot()
    if plt is None:
        return False
    rows = results["latency"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(rows) + 1.5), 3.6))
    width = 0.27
    for j, (key, label) in enumerate((("encode_ms", "encode"), ("infer_ms", "infer x_T"), ("decode_ms", "decode"))):
        ax.bar([i + (j - 1) * width for i in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['label']}\ninv {r['inversion_steps']} / dec {r['decode_nfe']}" for r in rows],
                  fontsize=8)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("ms per image (median)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----- files -----
def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_outputs(results: dict[str, Any], out: Path, grid_inputs: torch.Tensor,
                  grid_rows: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Path]:  # fmt: skip
    """``paper_claims.json``, ``paper_claims.md`` and the PNG plots (when matplotlib imports) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for name, fname, fn in (
        ("reconstruction metrics", "paper_claims_recon.png", lambda p: plot_reconstruction_metrics(results, p)),
        ("reconstructions", "paper_claims_grid.png", lambda p: plot_reconstruction_grid(grid_inputs, grid_rows, p)),
        ("latency", "paper_claims_latency.png", lambda p: plot_latency(results, p)),
    ):
        if fn(out / fname):
            plots[name] = fname
            paths[fname] = out / fname
    paths["json"] = out / "paper_claims.json"
    paths["md"] = out / "paper_claims.md"
    paths["json"].write_text(json.dumps(_clean({**results, "paper_table2_tractable": PAPER_TABLE2_TRACTABLE}),
                                        indent=2) + "\n")  # fmt: skip
    paths["md"].write_text(markdown(results, plots))
    return paths


__all__ = ["PAPER_TABLE2_TRACTABLE", "claims", "format_claims", "format_table", "markdown", "write_outputs"]
