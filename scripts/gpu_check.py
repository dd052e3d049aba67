"""Everything a GPU run of vigil must show, in one command (see scripts/gpu-check.sh).

    python3 scripts/gpu_check.py OUT --device cuda [--vigil BIN] [--root DIR] [--python PY]
    python3 scripts/gpu_check.py OUT --device cpu      # the same steps at a tiny size (dry run)

Steps, each recorded even when it fails (a GPU run is scarce: one failing step must not hide
the others):
1. parity: `vigil infer` on the committed fixtures (tests/fixtures/infer, both checkpoint
   layouts, every case) in f32 — generated ids must equal transformers' — and in bf16: the
   share of greedy positions equal to the f32 reference before the first divergence.
2. bench: `vigil bench` at the 2B shapes with random weights (16 frames of 448x448, 2 prompts,
   32 new tokens, 1 and 8 streams; tiny shapes on the CPU), then the transformers peer
   (tests/reference/bench_transformers.py) on the same weights in the same run, when the
   Python at --python has torch and transformers.
3. roofline: decode tokens/s at batch 1 as a share of the GPU's memory bandwidth (the weights a
   decode step reads, per second).
4. attention: `vigil bench attention`: the fused attention kernels' self-check against the
   reference path, then attention time per layer, fused vs reference, for vision (16 frames x
   1024 patches), prefill (8 x 2300 tokens) and decode (batch 1 and 16 over 2400 keys); on the
   CPU the same at tiny sizes with `--attention fused` (the kernels' plain-Rust twin).
5. engine: `vigil bench engine` on the tiny engine checkpoint in f32, 1 and 8 streams: the
   engine's batched paths on this device (prefixes prefilled packed, forked per prompt, questions
   mid-padded, windows of several streams in one batch) against each request alone, with the
   answers that differ counted, and windows/s both ways.
Writes OUT/summary.json and OUT/summary.md (and each step's raw output under OUT/).
Standard library only: it runs on the GPU machine's Python as it is.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# HBM bandwidth (GB/s) by GPU name, for the roofline share.
BANDWIDTH = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
             "A100": 2039, "L40S": 864, "L4": 300, "A10": 600, "RTX 4090": 1008}


def run(cmd, cwd=None, timeout=600, env=None):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, p.stdout, p.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        return 124, e.stdout or "", f"timed out after {timeout} s", time.time() - t0
    except OSError as e:
        return 127, "", str(e), time.time() - t0


def agreement(want, got):
    """Share of `want`'s positions that `got` matches before the first divergence."""
    n = 0
    for a, b in zip(want, got):
        if a != b:
            break
        n += 1
    return n / max(len(want), 1)


def parity(a, out):
    fx = os.path.join(a.root, "tests", "fixtures", "infer")
    expected = json.load(open(os.path.join(fx, "expected.json")))
    max_new = str(expected["max_new_tokens"])
    rows = []
    for layout, spec in expected["layouts"].items():
        for case, c in spec["cases"].items():
            row = {"layout": layout, "case": case, "want": c["token_ids"]}
            for dtype in ("f32", "bf16"):
                cmd = [a.vigil, "-q", "infer", "--model", f"ckpt_{layout}", "--device", a.device, "--dtype", dtype,
                       "--max-new-tokens", max_new, "--json"] + c["args"]
                rc, so, se, took = run(cmd, cwd=fx)
                r = {"rc": rc, "seconds": round(took, 2)}
                if rc == 0:
                    try:
                        got = json.loads(so)["token_ids"]
                        r["tokens"] = got
                        r["agreement"] = agreement(c["token_ids"], got)
                        r["equal"] = got == c["token_ids"]
                    except (ValueError, KeyError) as e:
                        r["error"] = f"unreadable output: {e}"
                elif "element factory" in se:
                    # A machine without GStreamer's plugins cannot decode the video file case.
                    r["skipped"] = "no GStreamer plugins to decode the file"
                else:
                    r["error"] = se.strip()[-500:]
                row[dtype] = r
            rows.append(row)
    json.dump(rows, open(os.path.join(out, "parity.json"), "w"), indent=1)
    skipped = [r for r in rows if "skipped" in r["f32"]]
    counted = [r for r in rows if "skipped" not in r["f32"]]
    ran = [r for r in counted if r["f32"].get("tokens") is not None]
    return {
        "cases": len(counted),
        "skipped": [f'{r["layout"]}/{r["case"]}: {r["f32"]["skipped"]}' for r in skipped],
        "f32_equal": sum(1 for r in ran if r["f32"]["equal"]),
        "f32_failed": [f'{r["layout"]}/{r["case"]}: {r["f32"].get("error", "tokens differ")}' for r in counted
                       if not r["f32"].get("equal")],
        "bf16_mean_agreement": (sum(r["bf16"].get("agreement", 0.0) for r in counted) / max(len(counted), 1)),
        "bf16_failed": [f'{r["layout"]}/{r["case"]}: {r["bf16"]["error"]}' for r in counted if "error" in r["bf16"]],
    }


def has_torch(py):
    rc, _, _, _ = run([py, "-c", "import torch, transformers"], timeout=120)
    return rc == 0


def bench(a, out):
    if a.device == "cpu":
        shape = os.path.join(a.root, "tests", "fixtures", "infer", "ckpt_tf5", "config.json")
        args = ["--shape", shape, "--frames", "4", "--size", "56x56", "--prompts", "2", "--new-tokens", "4",
                "--streams", "1,2", "--windows", "1"]
    else:
        args = ["--shape", "2b", "--frames", "16", "--size", "448x448", "--prompts", "2", "--new-tokens", "32",
                "--streams", "1,8", "--windows", "2"]
    weights = os.path.join(out, "weights")
    cmd = [a.vigil, "-q", "bench", "--random-weights", "--device", a.device, "--save-weights", weights, "--json"] + args
    rc, so, se, took = run(cmd, timeout=a.step_timeout)
    res = {"command": " ".join(cmd), "rc": rc, "seconds": round(took, 1)}
    if rc != 0:
        res["error"] = se.strip()[-1000:]
        return res, None
    open(os.path.join(out, "vigil.json"), "w").write(so)
    vj = json.loads(so)
    res["vigil"] = vj
    if not has_torch(a.python):
        res["peer"] = f"skipped: {a.python} has no torch/transformers"
        return res, vj
    peer = [a.python, os.path.join(a.root, "tests", "reference", "bench_transformers.py"), "--vigil",
            os.path.join(out, "vigil.json"), "--device", a.device, "--json", os.path.join(out, "transformers.json")]
    rc, so, se, took = run(peer, timeout=a.step_timeout)
    open(os.path.join(out, "comparison.txt"), "w").write(so + se)
    res["peer_rc"] = rc
    if rc == 0 and os.path.exists(os.path.join(out, "transformers.json")):
        res["transformers"] = json.load(open(os.path.join(out, "transformers.json")))
    else:
        res["peer_error"] = se.strip()[-1000:]
    return res, vj


def attention(a, out):
    cmd = [a.vigil, "-q", "bench", "attention", "--device", a.device, "--json"]
    # `fused`: time every kernel that passes its self-check, faster than the reference or not.
    cmd += ["--attention", "fused"]
    cmd += ["--tiny", "--iters", "1"] if a.device == "cpu" else ["--iters", "10"]
    rc, so, se, took = run(cmd, timeout=a.step_timeout)
    res = {"command": " ".join(cmd), "rc": rc, "seconds": round(took, 1)}
    if rc != 0:
        res["error"] = se.strip()[-1000:]
        return res
    open(os.path.join(out, "attention.json"), "w").write(so)
    try:
        res.update(json.loads(so))
    except ValueError as e:
        res["error"] = f"unreadable output: {e}"
    return res


def engine(a, out):
    ckpt = os.path.join(a.root, "tests", "fixtures", "engine", "ckpt")
    cmd = [a.vigil, "-q", "bench", "engine", "--model", ckpt, "--device", a.device, "--dtype", "f32",
           "--streams", "1,8", "--windows-per-stream", "4", "--json"]
    rc, so, se, took = run(cmd, timeout=a.step_timeout)
    res = {"command": " ".join(cmd), "rc": rc, "seconds": round(took, 1)}
    open(os.path.join(out, "engine.jsonl"), "w").write(so)
    # The rows come out before a mismatch fails the command: keep them either way.
    rows = []
    for line in so.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "mismatches" in r:
            c = r.get("counters") or {}
            rows.append({k: r.get(k) for k in ("streams", "windows", "on_windows_per_s", "off_windows_per_s", "mismatches")}
                        | {"answers": c.get("prompts_done"), "prefix_padding_skipped": c.get("prefix_padding_skipped")})
    res["rows"] = rows
    if not rows:
        res["error"] = se.strip()[-1000:] or "no rows"
    return res


def gpu_name():
    if not shutil.which("nvidia-smi"):
        return None
    rc, so, _, _ = run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], timeout=30)
    return so.strip().splitlines()[0] if rc == 0 and so.strip() else None


def roofline(vj, name):
    single = (vj or {}).get("single") or {}
    gbs = single.get("decode_weight_gb_per_s")
    bw = next((v for k, v in BANDWIDTH.items() if name and k in name), None)
    return {
        "gpu": name,
        "decode_tok_per_s": single.get("decode_tok_per_s"),
        "weights_gb_per_s": gbs,
        "bandwidth_gb_per_s": bw,
        "share_of_roofline": (gbs / bw) if (gbs and bw) else None,
    }


def streams_of(report):
    """windows/s per stream count from a bench report (vigil's or the peer's)."""
    got = {}
    for s in (report or {}).get("stream") or []:
        n = s.get("streams")
        if n is not None:
            got[str(n)] = s.get("windows_per_s")
    return got


def markdown(s):
    p, b, r = s["parity"], s["bench"], s["roofline"]
    lines = [f"# vigil GPU check ({s['device']}, {s.get('gpu') or 'no GPU name'})", "",
             f"- parity f32: {p['f32_equal']}/{p['cases']} cases token for token equal to transformers",
             f"- parity bf16: mean share of greedy positions equal before the first divergence "
             f"{p['bf16_mean_agreement']:.3f}"]
    for f in p["f32_failed"] + p["bf16_failed"]:
        lines.append(f"  - {f}")
    for f in p["skipped"]:
        lines.append(f"  - skipped {f}")
    if "error" in b:
        lines.append(f"- bench failed: {b['error'][-300:]}")
    else:
        ours, theirs = streams_of(b.get("vigil")), streams_of(b.get("transformers"))
        lines += ["", "| streams | vigil windows/s | transformers windows/s | ratio |", "|---|---|---|---|"]
        for n, w in ours.items():
            t = theirs.get(n)
            ratio = f"{w / t:.2f}x" if (w and t) else "-"
            lines.append(f"| {n} | {w:.3f} | {t if t is None else f'{t:.3f}'} | {ratio} |")
        if "peer" in b:
            lines.append(f"\ntransformers peer: {b['peer']}")
    if r["decode_tok_per_s"] is not None:
        lines += ["", f"- decode at batch 1: {r['decode_tok_per_s']:.1f} tok/s, {r['weights_gb_per_s']:.2f} GB/s of weights"
                  + (f", {100 * r['share_of_roofline']:.1f} % of {r['bandwidth_gb_per_s']} GB/s" if r["share_of_roofline"] else "")]
    if s.get("memory_peak_mib") is not None:
        lines.append(f"- memory peak (vigil): {s['memory_peak_mib']:.0f} MiB")
    at = s.get("attention") or {}
    if "error" in at:
        lines.append(f"- attention bench failed: {at['error'][-300:]}")
    elif at:
        lines += ["", "| attention self-check | passed | max abs diff | tolerance |", "|---|---|---|---|"]
        for c in at.get("selfcheck") or []:
            lines.append(f"| {c['kernel']} | {'yes' if c['passed'] else 'NO (reference used)'} | {c['max_abs_diff']:.3e} | {c['tolerance']:.1e} |")
        if not at.get("selfcheck"):
            lines.append("| (not run: the mode uses no fused kernel here) | | | |")
        lines += ["", "| attention per layer | path | reference ms | fused ms | speedup | fused TFLOP/s | fused KV GB/s |",
                  "|---|---|---|---|---|---|---|"]
        fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"
        for c in at.get("cases") or []:
            lines.append(f"| {c['case']} | {c['path']} | {c['reference_ms']:.3f} | {fmt(c['fused_ms'], 3)} | "
                         f"{fmt(c['speedup'], 2)} | {fmt(c['fused_tflop_per_s'], 1)} | {fmt(c['fused_kv_gb_per_s'], 0)} |")
    en = s.get("engine") or {}
    if "error" in en:
        lines.append(f"- engine bench failed: {en['error'][-300:]}")
    elif en:
        lines += ["", "| engine (tiny checkpoint, f32) streams | windows | answers | differing from alone | on windows/s | off windows/s |",
                  "|---|---|---|---|---|---|"]
        for r in en["rows"]:
            lines.append(f"| {r['streams']} | {r['windows']} | {r['answers']} | {r['mismatches']} | "
                         f"{r['on_windows_per_s']:.1f} | {r['off_windows_per_s']:.1f} |")
    lines.append(f"\ntotal {s['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vigil", default=None)
    ap.add_argument("--root", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--step-timeout", type=int, default=420)
    a = ap.parse_args()
    a.vigil = os.path.abspath(a.vigil or os.path.join(a.root, "target", "release", "vigil"))
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    s = {"device": a.device, "gpu": gpu_name(), "vigil": a.vigil}
    s["parity"] = parity(a, a.out)
    s["bench"], vj = bench(a, a.out)
    s["roofline"] = roofline(vj, s["gpu"])
    s["memory_peak_mib"] = (vj or {}).get("memory_peak_mib")
    s["attention"] = attention(a, a.out)
    s["engine"] = engine(a, a.out)
    s["seconds"] = time.time() - t0
    bench_light = {k: v for k, v in s["bench"].items() if k not in ("vigil", "transformers")}
    bench_light["vigil_streams"] = streams_of(s["bench"].get("vigil"))
    bench_light["transformers_streams"] = streams_of(s["bench"].get("transformers"))
    json.dump({**s, "bench": bench_light}, open(os.path.join(a.out, "summary.json"), "w"), indent=1)
    md = markdown(s)
    open(os.path.join(a.out, "summary.md"), "w").write(md)
    print(md)
    ok = (s["parity"]["f32_equal"] == s["parity"]["cases"] and "error" not in s["bench"]
          and "error" not in s["attention"] and "error" not in s["engine"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
