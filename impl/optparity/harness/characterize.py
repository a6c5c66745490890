"""The numerics map: how far apart torch's own implementations of each optimizer are.

For every algorithm x option set x dtype, torch.optim's for-loop path is run next to its foreach
path, its fused path (where torch has one on CPU), `torch.compile(opt.step)` of the for-loop
optimizer and, when a GPU is present, the CUDA paths, all from the same parameter and gradients.
Each pair gets: whether it is bit-identical, the first step at which it parts, and after the last
step the max ULP distance, max absolute and max relative error over the parameter and every state
tensor. Written as a pandas table (numerics.csv, numerics.md), a heat map (numerics.png) and
index.html:

    optparity characterize                      # reports/numerics/
    optparity characterize --no-compile --dtypes float32,bfloat16 --steps 5
"""
from __future__ import annotations

import html
import inspect
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
from torch import Tensor

from optparity.harness.algorithms import SPECS

DEFAULT_OUT = Path(__file__).resolve().parents[3] / "reports" / "numerics"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
BASELINE = "forloop"

# A handful per algorithm: the defaults and the options that change the arithmetic most.
OPTIONS: dict[str, list[dict]] = {
    "Adadelta": [{}, {"weight_decay": 0.1}, {"maximize": True}],
    "Adagrad": [{}, {"lr_decay": 0.01}, {"weight_decay": 0.1}],
    "Adam": [{}, {"amsgrad": True}, {"weight_decay": 0.1}, {"maximize": True}],
    "AdamW": [{}, {"amsgrad": True}, {"weight_decay": 0.1}],
    "Adamax": [{}, {"weight_decay": 0.1}],
    "ASGD": [{}, {"weight_decay": 0.1}],
    "NAdam": [{}, {"weight_decay": 0.1, "decoupled_weight_decay": True}, {"momentum_decay": 0.01}],
    "RAdam": [{}, {"weight_decay": 0.1, "decoupled_weight_decay": True}],
    "RMSprop": [{}, {"centered": True}, {"momentum": 0.9}, {"weight_decay": 0.1}],
    "Rprop": [{}, {"maximize": True}],
    "SGD": [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"weight_decay": 0.1}],
}
# Fed in ways one dense tensor cannot express (sparse gradients, a closure per step).
UNSUPPORTED_KINDS = {"sparse": "needs sparse gradients", "closure": "steps through a closure"}


def option_sets(algo: str) -> list[dict]:
    if algo in OPTIONS:
        return OPTIONS[algo]
    # An algorithm added later: its defaults and its first plain torch test configurations.
    plain = [c for c in SPECS[algo].torch_configs
             if c and not any(isinstance(v, Tensor) or k in ("differentiable", "capturable") for k, v in c.items())]
    return [{}] + plain[:2]


def format_options(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"


# ---------------------------------------------------------------- distances

_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def _ordered(t: Tensor) -> Tensor:
    """int64 keys whose order is the floats' order; -0.0 sits one below +0.0."""
    bits = t.view(_INT_VIEW[t.dtype]).to(torch.int64)
    magnitude = bits & ((1 << (t.element_size() * 8 - 1)) - 1)
    return torch.where(bits < 0, -magnitude - 1, magnitude)


def _max_abs_difference(a: Tensor, b: Tensor) -> int:
    """max |a - b| of two int64 tensors, exactly: the difference of two int64 can need 65 bits,
    so it is carried as hi * 2**32 + lo and only the maximum becomes a Python int."""
    if a.numel() == 0:
        return 0
    hi = (a >> 32) - (b >> 32)
    lo = (a & 0xFFFFFFFF) - (b & 0xFFFFFFFF)
    negative = (hi < 0) | ((hi == 0) & (lo < 0))
    hi, lo = torch.where(negative, -hi, hi), torch.where(negative, -lo, lo)
    borrow = (lo < 0).to(torch.int64)
    hi, lo = hi - borrow, lo + borrow * (1 << 32)
    top = hi.max()
    return (int(top) << 32) + int(lo[hi == top].max())


def max_ulp(a: Tensor, b: Tensor) -> int:
    """Largest ULP distance between two same-shaped real float tensors (NaN pairs excluded)."""
    keep = ~(torch.isnan(a) | torch.isnan(b))
    return _max_abs_difference(_ordered(a)[keep], _ordered(b)[keep])


def distance(a: Tensor, b: Tensor) -> dict:
    """Bit-identical (NaN matches NaN), max ULP, max abs and max relative error of `a` against
    `b` (relative to |b|, over elements where b != 0), and elements where only one is NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"cannot compare {a.dtype}{tuple(a.shape)} with {b.dtype}{tuple(b.shape)}")
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.dtype not in _INT_VIEW:
        same = torch.equal(a, b)
        return {"identical": same, "max_ulp": 0 if same else None, "max_abs": 0.0 if same else None,
                "max_rel": 0.0 if same else None, "nan_mismatch": 0}
    one_nan = torch.isnan(a) ^ torch.isnan(b)
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_bits = (a.view(_INT_VIEW[a.dtype]) == b.view(_INT_VIEW[b.dtype])) | both_nan
    if bool(same_bits.all()):
        return {"identical": True, "max_ulp": 0, "max_abs": 0.0, "max_rel": 0.0, "nan_mismatch": 0}
    keep = ~(one_nan | both_nan)
    a64, b64 = a.double()[keep], b.double()[keep]
    err = (a64 - b64).abs()
    nonzero = b64 != 0
    return {"identical": False, "max_ulp": max_ulp(a, b),
            "max_abs": float(err.max()) if err.numel() else 0.0,
            "max_rel": float((err[nonzero] / b64[nonzero].abs()).max()) if bool(nonzero.any()) else 0.0,
            "nan_mismatch": int(one_nan.sum())}


# ---------------------------------------------------------------- running the paths

def available_paths(algo: str, cuda: bool | None = None) -> list[str]:
    s = SPECS[algo]
    accepted = inspect.signature(s.torch_class()).parameters
    paths = ["forloop"] if "foreach" in accepted else ["default"]
    if s.foreach and "foreach" in accepted:
        paths.append("foreach")
    if s.fused_on_cpu:
        paths.append("fused")
    paths.append("compiled")
    if torch.cuda.is_available() if cuda is None else cuda:
        paths += ["cuda-" + p for p in paths if p != "compiled"]
        if s.fused_on_cuda and "cuda-fused" not in paths:
            paths.append("cuda-fused")
    return paths


def _shape(numel: int) -> tuple[int, int]:
    # 2-D (matrix optimizers take nothing else), as square as numel allows.
    rows = max(int(numel ** 0.5), 1)
    while numel % rows:
        rows -= 1
    return rows, numel // rows


def _path_kwargs(path: str) -> dict:
    base = path.removeprefix("cuda-")
    return {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True},
            "compiled": {"foreach": False}, "default": {}}[base]


def run_path(algo: str, options: dict, dtype: torch.dtype, path: str, numel: int, steps: int,
             seed: int = 0) -> Iterator[dict[str, Tensor]]:
    """Yield, after each step, the parameter and every state tensor (on the CPU)."""
    device = "cuda" if path.startswith("cuda-") else "cpu"
    shape = _shape(numel)
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    cls = SPECS[algo].torch_class()
    kwargs = _path_kwargs(path)
    if "foreach" not in inspect.signature(cls).parameters:
        kwargs.pop("foreach", None)
    opt = cls([param], **options, **kwargs)
    step = opt.step
    if path == "compiled":
        import torch._dynamo as dynamo
        from torch._dynamo.utils import counters

        dynamo.reset()  # a fresh cache: a hit on another optimizer's guards would run eager
        graphs_before = counters["stats"]["unique_graphs"]
        step = torch.compile(opt.step)
    for k in range(1, steps + 1):
        # Gradients drawn in float64 and rounded once, the same for every path and dtype.
        g = torch.Generator().manual_seed(seed * 1009 + k)
        param.grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # compile's profiler and recompilation notices
            step()
        if path == "compiled" and k == 1 and counters["stats"]["unique_graphs"] == graphs_before:
            raise RuntimeError("torch.compile produced no graph (the step ran eagerly)")
        snap = {"param": param.detach().cpu().clone()}
        for key, value in opt.state[param].items():
            if isinstance(value, Tensor):
                snap[key] = value.detach().cpu().clone()
        yield snap


def pairs(paths: list[str]) -> list[tuple[str, str]]:
    """(path, against): every path against the for-loop one, and fused against foreach."""
    base = paths[0]
    out = [(p, base) for p in paths[1:]]
    if "fused" in paths and "foreach" in paths:
        out.append(("fused", "foreach"))
    return out


def compare_paths(algo: str, options: dict, dtype: torch.dtype, paths: list[str], numel: int,
                  steps: int) -> list[dict]:
    """One row per pair of paths. Each path runs once; its per-step tensors are kept (CPU)."""
    runs: dict[str, list[dict[str, Tensor]] | str] = {}
    for path in paths:
        try:
            runs[path] = list(run_path(algo, options, dtype, path, numel, steps))
        except Exception as e:  # noqa: BLE001 - a path torch refuses is a fact of the map
            runs[path] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
    rows = []
    for path, against in pairs(paths):
        row = {"algorithm": algo, "options": format_options(options), "dtype": str(dtype).removeprefix("torch."),
               "pair": f"{path} vs {against}", "identical": None, "first_step": None, "max_ulp": None,
               "max_abs": None, "max_rel": None, "nan_mismatch": None, "tensor": None, "error": None}
        a, b = runs[path], runs[against]
        if isinstance(a, str) or isinstance(b, str):
            row["error"] = f"{path}: {a}" if isinstance(a, str) else f"{against}: {b}"
            rows.append(row)
            continue
        for k, (sa, sb) in enumerate(zip(a, b), 1):
            if sa.keys() != sb.keys():
                row["error"] = f"state keys differ: {sorted(sa)} vs {sorted(sb)}"
                break
            if row["first_step"] is None and not all(distance(sa[n], sb[n])["identical"] for n in sa):
                row["first_step"] = k
        if row["error"] is None:
            final = {n: distance(a[-1][n], b[-1][n]) for n in a[-1]}
            worst = max(final, key=lambda n: (final[n]["max_ulp"] or 0))
            row.update(identical=row["first_step"] is None,
                       max_ulp=max(d["max_ulp"] or 0 for d in final.values()),
                       max_abs=max(d["max_abs"] or 0.0 for d in final.values()),
                       max_rel=max(d["max_rel"] or 0.0 for d in final.values()),
                       nan_mismatch=sum(d["nan_mismatch"] for d in final.values()),
                       tensor=worst if final[worst]["max_ulp"] else None)
        rows.append(row)
    return rows


def characterize(algorithms=None, dtypes=("float32", "float64", "bfloat16", "float16"), steps: int = 10,
                 numel: int = 100_000, compile: bool = True, cuda: bool | None = None, threads: int | None = 1,
                 progress=None) -> pd.DataFrame:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    try:
        for algo in algorithms or SPECS:
            s = SPECS[algo]
            if s.kind in UNSUPPORTED_KINDS:
                rows.append({"algorithm": algo, "options": "-", "dtype": "-", "pair": "-",
                             "error": f"not mapped: {UNSUPPORTED_KINDS[s.kind]}"})
                continue
            paths = [p for p in available_paths(algo, cuda) if compile or p != "compiled"]
            for options in option_sets(algo):
                for name in dtypes:
                    if not s.low_precision and DTYPES[name] in (torch.float16, torch.bfloat16):
                        continue
                    start = time.perf_counter()
                    rows += compare_paths(algo, options, DTYPES[name], paths, numel, steps)
                    if progress:
                        progress(algo, options, name, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return pd.DataFrame(rows, columns=["algorithm", "options", "dtype", "pair", "identical", "first_step",
                                       "max_ulp", "max_abs", "max_rel", "nan_mismatch", "tensor", "error"])


# ---------------------------------------------------------------- output

def _cell(row) -> str:
    if isinstance(row.get("error"), str) and row["error"]:
        return "error"
    if row["identical"]:
        return "0"
    return f"{int(row['max_ulp'])} ulp, step {int(row['first_step'])}"


def pivot(table: pd.DataFrame) -> pd.DataFrame:
    """algorithm / options / pair rows, one column per dtype: '0' (bit-identical) or
    '<max ulp> ulp, step <first differing step>'."""
    t = table[table["pair"] != "-"].copy()
    t["cell"] = [_cell(r) for r in t.to_dict("records")]
    order = [d for d in DTYPES if d in set(t["dtype"])]
    out = t.pivot_table(index=["algorithm", "options", "pair"], columns="dtype", values="cell",
                        aggfunc="first", sort=False)
    return out.reindex(columns=order).fillna("-").reset_index()


def heat_map(table: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t = table[(table["pair"] != "-")].copy()
    t["row"] = t["algorithm"] + " " + t["options"]
    t["col"] = t["pair"] + "\n" + t["dtype"]
    rows = list(dict.fromkeys(t["row"]))
    cols = sorted(dict.fromkeys(t["col"]), key=lambda c: (c.split("\n")[0], list(DTYPES).index(c.split("\n")[1])))
    values = np.full((len(rows), len(cols)), np.nan)
    labels = [["" for _ in cols] for _ in rows]
    for r in t.to_dict("records"):
        i, j = rows.index(r["row"]), cols.index(r["col"])
        if isinstance(r["error"], str) and r["error"]:
            labels[i][j] = "err"
        else:
            values[i, j] = np.log10(1 + float(r["max_ulp"]))
            labels[i][j] = "=" if r["identical"] else f"{int(r['max_ulp'])}"
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(cols) + 3), max(4, 0.28 * len(rows) + 2)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto", vmin=0)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=5.5,
                    color="white" if np.isfinite(values[i, j]) and values[i, j] < 0.6 * np.nanmax(values) else "black")
    fig.colorbar(im, ax=ax, label="log10(1 + max ULP) after the last step")
    ax.set_title("torch.optim's paths against each other ('=' bit-identical, number: max ULP, grey: error)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(table: pd.DataFrame, out_dir: Path, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md, png, index = (out_dir / n for n in ("numerics.csv", "numerics.md", "numerics.png", "index.html"))
    table.to_csv(csv, index=False)
    piv = pivot(table)
    errors = table[table["error"].notna()][["algorithm", "options", "dtype", "pair", "error"]]
    run = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    md.write_text(f"# torch.optim's paths against each other\n\n{run}\n\n"
                  "Cells: `0` bit-identical over every step; otherwise the max ULP distance after the last "
                  "step (parameter and every state tensor) and the first step at which the paths part.\n\n"
                  f"{piv.to_markdown(index=False)}\n\n## Errors\n\n"
                  f"{errors.to_markdown(index=False) if not errors.empty else '(none)'}\n\n"
                  "## Every pair\n\n" f"{table.to_markdown(index=False)}\n")
    heat_map(table, png)
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>optparity numerics map</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>",
            "<h1>torch.optim's paths against each other</h1><ul>"]
    page += [f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in meta.items()]
    page += ["</ul><p>Files: <a href='numerics.csv'>numerics.csv</a>, <a href='numerics.md'>numerics.md</a>, "
             "<a href='numerics.png'>numerics.png</a></p>", "<img src='numerics.png'>",
             "<h2>Max ULP after the last step, and the first step at which the paths part</h2>",
             piv.to_html(index=False), "<h2>Errors</h2>",
             errors.to_html(index=False) if not errors.empty else "<p>(none)</p>",
             "<h2>Every pair</h2>", table.to_html(index=False), "</body></html>"]
    index.write_text("\n".join(page))
    return [csv, md, png, index]


def run_meta(steps: int, numel: int, dtypes, compile: bool) -> dict:
    return {"torch": torch.__version__, "platform": f"{platform.system()}-{platform.machine()}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU paths only)",
            "steps": steps, "elements": f"{numel} ({'x'.join(map(str, _shape(numel)))})",
            "dtypes": ",".join(dtypes), "compiled path": "torch.compile(opt.step), foreach=False" if compile else "skipped",
            "threads": 1}


def _run(args) -> int:
    from optparity.harness.algorithms import ALGORITHMS

    unknown = [a for a in args.algorithms or () if a not in ALGORITHMS]
    if unknown:
        print(f"optparity characterize: unknown algorithm(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    start = time.perf_counter()

    def progress(algo, options, dtype, seconds):
        if not args.quiet:
            print(f"{algo:10s} {format_options(options):40s} {dtype:9s} {seconds:6.1f} s", flush=True)

    table = characterize(args.algorithms, dtypes=tuple(args.dtypes), steps=args.steps, numel=args.numel,
                         compile=not args.no_compile, progress=progress)
    meta = run_meta(args.steps, args.numel, args.dtypes, not args.no_compile)
    meta["command"] = "optparity characterize " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["characterize"] else "-"
    meta["seconds"] = f"{time.perf_counter() - start:.0f}"
    files = write(table, Path(args.out), meta)
    print(pivot(table).to_string(index=False))
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0


def add_parser(sub, csv, positive_int) -> None:
    from optparity.harness.algorithms import ALGORITHMS

    p = sub.add_parser("characterize", help="map how far apart torch's own optimizer paths are",
                       description="For every algorithm x option set x dtype: torch.optim's for-loop path against "
                                   "its foreach, fused and torch.compile'd steps (and CUDA when present): "
                                   "bit-identical or not, first step they part, max ULP / abs / rel error.")
    p.add_argument("--algorithms", type=csv(list(ALGORITHMS)), help="default: all")
    p.add_argument("--dtypes", type=csv(list(DTYPES)), default=list(DTYPES), help="default: %(default)s")
    p.add_argument("--steps", type=positive_int, default=10, help="default: %(default)s")
    p.add_argument("--numel", type=positive_int, default=100_000, help="elements of the parameter (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd path (slow to compile)")
    p.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR", help="default: %(default)s")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_run)
