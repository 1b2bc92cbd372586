"""k sweeps and demonstration orders (issue 13, items 3, 4, 6): planning and the command line,
the seeded permutation, what a cell sees, full-batch GD's order invariance, and the report's
k-sweep and order-sensitivity tables and figures."""

from __future__ import annotations

import csv
import json
import math
from itertools import permutations

import numpy as np
import pytest
import torch

from iclgd import cli, experiment, report, sweep
from iclgd.data import demo_order, select_examples
from iclgd.processes import PROCESSES, ProcessConfig, TrainContext

from conftest import SHARED_DATA
from runfolders import write_run
from tiny import tiny_loaded

D = str(SHARED_DATA)
# Full-batch GD is one step on the mean of the demonstrations' losses: a permutation changes only
# the order in which float32 sums are taken. Measured on the tiny model (lr 0.1): parameters agree
# to ~1e-7 of the update's size, label log-probabilities to ~2e-6 nats; the tolerances leave 50-100x.
# Batch-1 GD on the same cell moves them by ~1e-1 of the update and ~0.2 nats.
REL_TOL_DELTA = 1e-5  # |Δθ_o − Δθ_0| <= REL_TOL_DELTA · max |Δθ_0|
TOL_LOGP = 1e-4  # nats: Δ log p of an order-invariant process (report_orders)



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these tiny models spend 2 threads' time waking each other on a shared CPU
    (10x slower under load); every comparison here is within one thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- the command line


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def call(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main([argv[0], "--data-dir", D, "--quiet", *argv[1:]])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return code, out, err


# (id, argv, a fragment the message must contain): each fails while planning, with exit 2
PLAN_ERRORS = [
    ("k list with a word", ["reproduce", "--tasks", "sst2", "--k", "4,x"], "--k must be a comma list of integers"),
    ("k list empty", ["reproduce", "--tasks", "sst2", "--k", ","], "--k is empty"),
    ("k negative in a list", ["reproduce", "--tasks", "sst2", "--k", "4,-1"], "k must be an integer >= 0"),
    ("k twice", ["reproduce", "--tasks", "sst2", "--k", "4,8,4"], "k 4 given twice"),
    ("k above the pool in a list", ["reproduce", "--tasks", "cb", "--k", "4,300"], "k=300"),
    ("orders 0", ["reproduce", "--tasks", "sst2", "--orders", "0"], "--orders must be >= 1"),
    ("orders negative", ["reproduce", "--tasks", "sst2", "--orders", "-2"], "--orders must be >= 1"),
    ("orders not a number", ["reproduce", "--orders", "two"], "invalid int value"),
    ("k 0 without zsl or icl", ["reproduce", "--tasks", "sst2", "--k", "0,4", "--settings", "gd,lcgd"],
     "k = 0 cells run only zsl and icl"),
    ("order negative", ["run", "--order", "-1"], "order must be >= 0"),
    ("order past k!", ["run", "--k", "2", "--order", "2"], "k = 2 demonstrations have 2 ordering(s)"),
    ("order with k 0", ["run", "--k", "0", "--order", "1"], "have 1 ordering(s)"),
    ("order not a number", ["run", "--order", "x"], "invalid int value"),
]


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in PLAN_ERRORS], ids=[c[0] for c in PLAN_ERRORS])
def test_bad_k_lists_and_orders_fail_fast(argv, fragment, home, no_model, capsys):
    code, _, err = call(argv, capsys)
    assert code == 2 and fragment in err, err


def test_dry_run_of_a_k_sweep_with_orders(home, no_model, capsys):
    code, out, err = call(["reproduce", "--tasks", "sst2", "--seeds", "2", "--k", "0,4", "--orders", "3",
                           "--settings", "zsl,icl,gd", "--lr", "1e-3", "--dry-run"], capsys)
    assert code == 0, err
    folders = [line.rsplit("/", 1)[1] for line in out.splitlines() if line.startswith("- ")]
    assert folders == ["sst2_s2_k0", "sst2_s2_k4", "sst2_s2_k4_o1", "sst2_s2_k4_o2"]
    k0 = out.split("sst2_s2_k0\n", 1)[1].split("\n- ", 1)[0]
    assert k0.split() == ["zsl", "icl"]  # no process at k = 0
    assert "k 4 · order 2 ·" in out


# ---------------------------------------------------------------- the plan


def _plan(**kw):
    opts = dict(model="tiny-llama", settings="zsl,icl,gd", lr=1e-3, check_data=False, progress=False) | kw
    return sweep.plan_cells(["sst2"], [2], **opts)


def test_plan_cells_one_cell_per_k_and_order(tmp_path):
    cells = _plan(k=[0, 2, 4], orders=3, root=tmp_path, controls=("untrained",))
    got = [(c.k, c.order, c.control, c.out.name, tuple(c.labels)) for c in cells]
    assert got == [
        (0, 0, None, "sst2_s2_k0", ("zsl", "icl")),  # k = 0: one ordering, zsl and icl only
        (0, 0, "untrained", "sst2_s2_k0_untrained", ("zsl", "icl")),
        (2, 0, None, "sst2_s2_k2", ("zsl", "icl", "gd")),  # k = 2: 2! = 2 orderings
        (2, 0, "untrained", "sst2_s2_k2_untrained", ("zsl", "icl", "gd")),
        (2, 1, None, "sst2_s2_k2_o1", ("zsl", "icl", "gd")),
        (2, 1, "untrained", "sst2_s2_k2_o1_untrained", ("zsl", "icl", "gd")),
        (4, 0, None, "sst2_s2_k4", ("zsl", "icl", "gd")),
        (4, 0, "untrained", "sst2_s2_k4_untrained", ("zsl", "icl", "gd")),
        (4, 1, None, "sst2_s2_k4_o1", ("zsl", "icl", "gd")),
        (4, 1, "untrained", "sst2_s2_k4_o1_untrained", ("zsl", "icl", "gd")),
        (4, 2, None, "sst2_s2_k4_o2", ("zsl", "icl", "gd")),
        (4, 2, "untrained", "sst2_s2_k4_o2_untrained", ("zsl", "icl", "gd")),
    ]
    assert len({c.out for c in cells}) == len(cells)
    assert [c.decisive().get("order") for c in cells if c.control is None] == [None, None, 1, None, 1, 2]


def test_one_k_keeps_todays_folders_and_order_0_is_the_cell_without_orders(tmp_path):
    before = _plan(k=4, root=tmp_path)  # a sweep made before k lists and orders
    after = _plan(k=[4], orders=2, root=tmp_path)
    assert [c.out.name for c in before] == ["sst2_s2"]
    assert [c.out.name for c in after] == ["sst2_s2", "sst2_s2_o1"]
    assert after[0].decisive() == before[0].decisive()  # a finished order-0 folder is reused


# ---------------------------------------------------------------- the permutation


def test_demo_order_is_seeded_distinct_and_pinned():
    assert demo_order(5, 2, 0) == (0, 1, 2, 3, 4)
    assert demo_order(8, 2, 1) == demo_order(8, 2, 1) != demo_order(8, 3, 1)
    # pinned: the rule (a hash of run seed and order) is part of every permuted result
    assert demo_order(8, 2, 1) == (4, 0, 5, 3, 6, 7, 2, 1)
    assert sorted(demo_order(3, 7, o) for o in range(6)) == sorted(permutations(range(3)))  # all distinct
    for k in (4, 6, 9):
        assert sorted(demo_order(k, 2, 3)) == list(range(k))
    with pytest.raises(ValueError, match="orderings"):
        demo_order(3, 2, 6)


# ---------------------------------------------------------------- cells on a tiny model

SETTINGS = ("zsl", "icl", "gd", "gd[batch=full]")


def _records(result) -> dict:
    return {s: {k: v.numpy() for k, v in vars(rec).items() if isinstance(v, torch.Tensor)}
            | {k: v.numpy() for k, v in rec.extras.items()} for s, rec in result.records.items()}


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """Order 0 and order 1 of one cell, and order 1 with the identity for its permutation; what
    ICL's prefix and each process's training sequences were (spied), per run."""
    root = tmp_path_factory.mktemp("orders")
    loaded = tiny_loaded("llama")
    plan = sweep.plan_cells(["sst2"], [2], model="tiny-llama", k=4, orders=2, settings=SETTINGS, eval_cap=4,
                            data_dir=D, lr=0.1, root=root / "runs", progress=False)
    seen: list[dict] = []
    real_evaluate, real_ctx = experiment.evaluate, experiment.TrainContext

    def spy_evaluate(model, queries, gold, label_ids, *, prefix=(), desc="", **kw):
        seen[-1].setdefault("prefix", {})[desc] = list(prefix)
        return real_evaluate(model, queries, gold, label_ids, prefix=prefix, desc=desc, **kw)

    def spy_ctx(model, sequences, config, **kw):
        seen[-1].setdefault("train", {})[config.name + ("[full]" if config.full_batch else "")] = \
            [list(s) for s in sequences]
        return real_ctx(model, sequences, config, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(experiment, "evaluate", spy_evaluate)
    mp.setattr(experiment, "TrainContext", spy_ctx)
    out = {}
    try:
        for name, cell in (("o0", plan[0]), ("o1", plan[1])):
            seen.append({})
            out[name] = (experiment.run(cell, loaded=loaded), seen[-1])
        seen.append({})
        mp.setattr(experiment, "demo_order", lambda k, seed, order: tuple(range(k)))
        # the settings whose numbers the order could change; zsl and icl for the prompts
        ident = plan[1].with_(out=root / "identity", settings=plan[1].settings[:3])
        out["identity"] = (experiment.run(ident, loaded=loaded), seen[-1])
    finally:
        mp.undo()
    out["root"] = root
    return out


def test_permuted_demonstrations_are_recorded_and_seen_by_icl_and_every_process(cells):
    r0, _ = cells["o0"]
    r1, seen = cells["o1"]
    sel = select_examples("sst2", 2, 4, D, eval_cap=4)
    perm = demo_order(4, 2, 1)
    assert perm != (0, 1, 2, 3)
    written = [json.loads(line)["id"] for line in (r1.path / "demos.jsonl").read_text().splitlines()]
    assert written == [sel.demos[i].id for i in perm]  # demos.jsonl shows the order used
    assert [d["id"] for d in r0.demos] == [d.id for d in sel.demos]
    config = json.loads((r1.path / "config.json").read_text())
    assert config["order"] == 1 and config["demo_order"] == list(perm) and config["decisive"]["order"] == 1
    # ICL's prefix is start + d1 + sep + ... + dk + sep, with the d_i in the order every process trains on
    seqs, sep = seen["train"]["gd"], config["prompts"]["separator_ids"]
    assert seen["train"]["gd[full]"] == seqs
    assert seen["prefix"]["icl"] == seqs[0][:1] + [t for s in seqs for t in s[1:] + sep]
    _, seen0 = cells["o0"]
    assert [seen0["train"]["gd"][i] for i in perm] == seqs  # the same demonstrations, permuted


def test_order_0_is_the_unpermuted_cell_bit_for_bit(cells):
    """Order 1 run with the identity for its permutation equals order 0 in every array: the
    permutation path changes nothing but the order."""
    a, b = _records(cells["o0"][0]), _records(cells["identity"][0])
    assert set(b) == {"zsl", "icl", "gd"}
    for s in b:
        for key in a[s]:
            assert np.array_equal(a[s][key], b[s][key], equal_nan=True), (s, key)


def test_full_batch_gd_is_order_invariant_and_batch_1_is_not(cells):
    a, b = _records(cells["o0"][0]), _records(cells["o1"][0])
    for key in a["zsl"]:  # ZSL never sees the demonstrations
        assert np.array_equal(a["zsl"][key], b["zsl"][key], equal_nan=True), key
    assert not np.array_equal(a["icl"]["label_logprobs"], b["icl"]["label_logprobs"])

    def drift(s):  # the largest change of a label log-probability, nats
        return float(np.abs(a[s]["label_logprobs"] - b[s]["label_logprobs"]).max())

    assert drift("gd[batch=full]") < TOL_LOGP
    assert np.array_equal(a["gd[batch=full]"]["pred"], b["gd[batch=full]"]["pred"])
    assert drift("gd") > 100 * TOL_LOGP  # the same check fails for batch-1 GD


def test_full_batch_training_is_order_invariant_up_to_rounding():
    loaded = tiny_loaded("llama")
    gen = torch.Generator().manual_seed(0)
    seqs = [[0, *torch.randint(3, 500, (int(n),), generator=gen).tolist()]
            for n in torch.randint(5, 20, (6,), generator=gen)]

    def worst(full_batch: bool) -> float:
        deltas = []
        for o in range(3):
            ctx = TrainContext(loaded.model, [seqs[i] for i in demo_order(6, 2, o)],
                               ProcessConfig("gd", 1e-2, full_batch=full_batch), progress=False)
            deltas.append(PROCESSES.get("gd")().train(ctx).delta)
        scale = max(float(v.abs().max()) for v in deltas[0].values())
        return max(float((d[n] - deltas[0][n]).abs().max()) for d in deltas[1:] for n in d) / scale

    assert worst(True) <= REL_TOL_DELTA
    assert worst(False) > 1e3 * REL_TOL_DELTA  # batch-1 SGD: each step starts where the last ended


def test_report_of_real_cells_shows_the_invariance(cells, tmp_path):
    out = tmp_path / "report"
    report.build_report(cells["root"] / "runs", out, figures=False)
    with (out / "tables" / "order_flips.csv").open() as f:
        rows = {(r["setting"], r["quantity"]): float(r["value"]) for r in csv.DictReader(f)}
    assert rows["zsl", "Δ log p (nats)"] == 0.0 and rows["zsl", "flip rate, any (%)"] == 0.0
    assert rows["gd[batch=full]", "Δ log p (nats)"] < TOL_LOGP
    assert rows["gd[batch=full]", "flip rate, any (%)"] == 0.0
    assert rows["gd", "Δ log p (nats)"] > 100 * TOL_LOGP and rows["icl", "Δ log p (nats)"] > 100 * TOL_LOGP
    with (out / "tables" / "order_spread.csv").open() as f:
        spread = {(r["table"], r["column"]): r for r in csv.DictReader(f)}
    assert float(spread["accuracy", "gd[batch=full]"]["sd"]) == 0.0
    assert float(spread["accuracy", "zsl"]["range"]) == 0.0


# ---------------------------------------------------------------- the report on constructed runs


def _sweep(root, ks, seeds, orders):
    """Run folders of sst2 as a k sweep with orders names them (k = 0: zsl and icl, one order)."""
    for k in ks:
        for seed in seeds:
            for order in range(1 if k == 0 else orders):
                write_run(root, "sst2", seed, ("zsl", "icl") if k == 0 else ("zsl", "icl", "gd"), k=k, order=order)
    return root


def _acc(root, name, setting):
    with np.load(root / name / "records" / f"{setting}.npz") as z:
        return 100 * float(np.mean(z["pred"] == z["gold"]))


def test_ksweep_tables_match_the_runs(tmp_path):
    root = _sweep(tmp_path / "runs", (0, 4, 8), (2, 3), orders=2)
    out = tmp_path / "report"
    report.build_report(root, out, figures=False)
    with (out / "tables" / "ksweep.csv").open() as f:
        got = {(r["table"], r["column"], int(r["k"])): r for r in csv.DictReader(f)}
    for k in (0, 4, 8):
        for s in ("zsl", "icl") + (("gd",) if k else ()):
            accs = [_acc(root, f"sst2_s{seed}_k{k}", s) for seed in (2, 3)]  # order 0 only
            r = got["accuracy", s, k]
            assert float(r["value"]) == pytest.approx(np.mean(accs), abs=1e-9)
            assert float(r["sd"]) == pytest.approx(np.std(accs, ddof=1), abs=1e-9)
            assert r["interval"] == "t" and int(r["n_seeds"]) == 2
    assert ("accuracy", "gd", 0) not in got and ("simaou", "gd (norm)", 4) in got
    md = (out / "tables" / "ksweep_accuracy.md").read_text()
    assert "| task | entry | k=0 | k=4 | k=8 | seeds per k |" in md
    # the main tables: one group per k; permuted orders are never pooled as seeds
    with (out / "tables" / "accuracy.csv").open() as f:
        main = [r for r in csv.DictReader(f) if r["task"] == "sst2" and r["column"] == "icl"]
    assert sorted(int(r["k"]) for r in main) == [0, 4, 8] and all(int(r["n"]) == 2 for r in main)
    summary = (out / "summary.md").read_text()
    for part in ("## k sweep", "## Order sensitivity", "## Attention ranking", "| k=4 · sst2 |", "| 4 | all (2) |"):
        assert part in summary, part
    again = tmp_path / "again"  # rebuilt from the same runs: the same bytes
    report.build_report(root, again, figures=False)
    for p in sorted((out / "tables").iterdir()) + [out / "summary.md", out / "report.html"]:
        assert (again / p.relative_to(out)).read_bytes() == p.read_bytes(), p.name


def test_sweep_figures_one_seed(tmp_path):
    root = _sweep(tmp_path / "runs", (0, 4), (2,), orders=2)
    out = tmp_path / "report"
    report.build_report(root, out)
    with (out / "tables" / "ksweep.csv").open() as f:  # one seed: the cell's bootstrap interval
        row = next(r for r in csv.DictReader(f) if (r["table"], r["column"], r["k"]) == ("accuracy", "icl", "4"))
    assert row["interval"] == "bootstrap" and float(row["low"]) <= float(row["value"]) <= float(row["high"])
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"ksweep_sst2.png", "order_flips.png", "order_spread.png", "order_accuracy.png", "accuracy_k4.png",
            "accuracy_k0.png", "headline_intervals_k4.png"} <= figures
    assert (out / "report.html").read_text().count("data:image/png;base64,") == len(figures)


def test_order_tables_match_a_direct_computation(tmp_path):
    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    n = 6
    preds = {o: rng.integers(0, 2, size=n) for o in range(3)}
    lps = {o: np.log(rng.dirichlet([1, 1], size=n)).astype(np.float32) for o in range(3)}
    for o in range(3):
        write_run(root, "sst2", 2, ("zsl", "icl", "gd"), n=n, order=o,
                  arrays={"icl": {"pred": preds[o], "label_logprobs": lps[o]}})
    out = tmp_path / "report"
    report.build_report(root, out, figures=False)
    with (out / "tables" / "order_flips.csv").open() as f:
        rows = {(r["setting"], r["quantity"]): r for r in csv.DictReader(f)}
    p = np.stack([preds[o] for o in range(3)])
    any_flip = 100 * np.mean((p != p[0]).any(0))
    pairwise = 100 * np.mean([(p[i] != p[j]).mean() for i, j in ((0, 1), (0, 2), (1, 2))])
    lp = np.stack([lps[o].astype(np.float64) for o in range(3)])
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    dlogp = np.mean(np.abs(lp[1:] - lp[0]).max(-1).mean(0))
    assert float(rows["icl", "flip rate, any (%)"]["value"]) == pytest.approx(any_flip)
    assert float(rows["icl", "flip rate, pairwise (%)"]["value"]) == pytest.approx(pairwise)
    assert float(rows["icl", "Δ log p (nats)"]["value"]) == pytest.approx(dlogp, rel=1e-6)
    low, high = float(rows["icl", "flip rate, any (%)"]["low"]), float(rows["icl", "flip rate, any (%)"]["high"])
    assert low <= any_flip <= high
    with (out / "tables" / "order_spread.csv").open() as f:
        spread = {(r["table"], r["column"]): r for r in csv.DictReader(f)}
    gold = np.asarray(json_lines(root / "sst2_s2" / "eval.jsonl", "gold"))
    accs = [100 * np.mean(preds[o] == gold) for o in range(3)]
    r = spread["accuracy", "icl"]
    assert [float(x) for x in r["per_order"].split(";")] == pytest.approx(accs)
    assert float(r["sd"]) == pytest.approx(np.std(accs, ddof=1))
    assert float(r["range"]) == pytest.approx(max(accs) - min(accs))
    assert int(r["orders"]) == 3 and math.isfinite(float(r["sd_high"]))


def test_order_entries_resting_on_a_flagged_run_carry_the_mark(tmp_path):
    """ICL is degenerate under one order only: its flips and spread rest on that run, so its rows
    carry † (Markdown) and flagged 1 (CSV), in every seed's row and the pooled one; GD's do not."""
    root = tmp_path / "runs"
    for seed in (2, 3):
        for o in range(2):
            write_run(root, "sst2", seed, ("zsl", "icl", "gd"), order=o,
                      flags={"icl": ["one_class"]} if (seed, o) == (3, 1) else None)
    out = tmp_path / "report"
    report.build_report(root, out, figures=False)
    with (out / "tables" / "order_flips.csv").open() as f:
        flagged = {(r["seed"], r["setting"]): r["flagged"] for r in csv.DictReader(f)}
    assert flagged["3", "icl"] == "1"
    assert flagged["2", "icl"] == "0" and flagged["3", "gd"] == "0" and flagged["3", "zsl"] == "0"
    rows = [line.split(" | ") for line in (out / "tables" / "order_flips.md").read_text().splitlines()
            if line.startswith("| sst2")]
    marked = {(r[2], r[4]) for r in rows if r[4].endswith("†")}
    assert marked == {("3", "icl †"), ("all (2)", "icl †")}, marked
    spread = (out / "tables" / "order_spread.md").read_text()
    assert any("accuracy: icl" in line and "†" in line for line in spread.splitlines())


def json_lines(path, key):
    return [json.loads(line)[key] for line in path.read_text().splitlines() if line.strip()]


def test_orders_that_cannot_be_compared_are_named(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "sst2", 2, ("zsl", "icl", "gd"))
    write_run(root, "sst2", 2, ("zsl", "icl"), order=1)  # other settings besides the order
    write_run(root, "cb", 3, order=1)  # no original order to compare with
    out = tmp_path / "report"
    report.build_report(root, out, figures=False)
    summary = (out / "summary.md").read_text()
    assert "sst2 s2 k4: the orders' runs were made with other choices" in summary
    assert "cb_s3_o1: order 1 without the original order's run" in summary
    assert not (out / "tables" / "order_flips.md").exists()
