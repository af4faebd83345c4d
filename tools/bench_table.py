"""FLOPs per token, device peaks, the projection to a T4 and the printed table, for tools/bench.py."""

# dense bf16 tensor-core peaks (T4: fp16); the first name found in the device's name counts
PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L4": 121, "T4": 65}
DEFAULT_EXPERIMENT_REVIEWS = 80 * 128  # train.py's max_iters x examples per step


def training_flops_per_token(shape, lora_rank, tokens_per_review, targets_per_review):
    """Honest counts: frozen matmuls cost 2x their forward (input gradients only), trained ones 3x."""
    L, C, V = shape["n_layer"], shape["n_embd"], 50257
    body = 2 * 12 * L * C * C                     # q, k, v, proj and the MLP, forward
    attention = 2 * L * C * tokens_per_review     # scores and values over the causal context, forward
    head = 2 * V * C * targets_per_review / tokens_per_review  # lm_head only where there is a target
    if lora_rank == 0:
        return 3 * (body + attention + head)
    return 2 * (body + head) + 3 * attention + 3 * 12 * L * C * lora_rank


def peak_tflops(name):
    """The device's dense peak in TFLOP/s, or None when its name is not in PEAK_TFLOPS."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def t4_projection(rows, name, tokens_per_review):
    """Rows scaled from this device to a T4 by the ratio of their peaks: a projection, not a measurement."""
    peak = peak_tflops(name)
    if peak is None or "T4" in name:
        return []
    ratio = PEAK_TFLOPS["T4"] / peak
    note = f"peak ratio {PEAK_TFLOPS['T4']}/{peak}"
    projected = []
    for r in rows:
        if r["who"] != "ours" or "projected" in r["what"]:
            continue
        if "tokens_per_s" in r:
            tokens_per_s = r["tokens_per_s"] * ratio
            projected.append(dict(what=f"projected T4: {r['what']}", who="ours", tokens_per_s=tokens_per_s,
                                  seconds=DEFAULT_EXPERIMENT_REVIEWS * tokens_per_review / tokens_per_s,
                                  note=f"{note}; seconds: the default experiment's training steps"))
        elif "batched" in r["what"]:
            projected.append(dict(what=f"projected T4: {r['what']}", who="ours", seconds=r["seconds"] / ratio,
                                  note=note))
    return projected


def print_table(rows):
    """Print the rows as a table, then the end-to-end split, the prompting costs and the T4 notes."""
    print(f"\n{'what':<48} {'who':<18} {'tokens/s':>10} {'step ms':>8} {'GiB':>6} {'MFU':>6} "
          f"{'seconds':>8} {'x':>5}")
    for r in rows:
        if "megabytes" in r:
            print(f"{r['what']:<48} {r['who']:<18} {r['seconds']:.2f} s, {r['megabytes']:,.1f} MB")
            continue
        if "mib_per_review" in r:
            print(f"{r['what']:<48} {r['who']:<18} {r['mib_per_review']:.1f} MiB per review of "
                  f"{r['tokens_per_review']} tokens, + {r['fixed_mib']:.0f} MiB fixed")
            continue
        cells = [f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "",
                 f"{r['step_ms']:.1f}" if "step_ms" in r else "",
                 f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") else "",
                 f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "",
                 f"{r['seconds']:.3f}" if "seconds" in r else r.get("skipped", ""),
                 f"{r['speedup']:.2f}" if "speedup" in r else ""]
        print(f"{r['what']:<48} {r['who']:<18} {cells[0]:>10} {cells[1]:>8} {cells[2]:>6} {cells[3]:>6} "
              f"{cells[4]:>8} {cells[5]:>5}")
    for r in rows:
        if "loop_s" in r:
            print(f"{r['what']}: {r['seconds']:.1f} s, of which the training loop {r['loop_s']:.1f} s: steps "
                  f"{r['train_steps_s']:.1f} s, validation {r['validation_s']:.1f} s, checkpoint writes and "
                  f"logging {r['loop_rest_s']:.1f} s")
    for r in rows:
        if r.get("cost_vs_zero_shot", 1) != 1:
            print(f"{r['what']} ({r['who']}): {r['cost_vs_zero_shot']:.2f} x the 0-shot evaluation's time")
    for note in dict.fromkeys(r["note"] for r in rows if "note" in r):
        print(f"projected T4 rows are not measured: {note}")
