"""Delta benchmark: how small is one RL step's weight update on the wire?

Takes a model, runs one AdamW step at lr 1e-6 on a short language-modelling batch, and saves
the weights before and after the step, in bf16 and in fp32. Each pair is published through
an origin as version 1 (full) and version 2 (delta against 1); a client holding version 1
then fetches version 2 and rebuilds it, checking every file's hash.

    python bench/shardcast_delta.py                      # SmolLM2-135M (toploc.models preset)
    python bench/shardcast_delta.py --model DIR          # any Hugging Face model folder
    python bench/shardcast_delta.py --quick              # synthetic 20M-parameter tensor set

The synthetic set models the first Adam step: every weight moves by about lr (Adam's first
update is lr * sign(gradient)).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import trio
from safetensors.torch import save_file
from shardcast_common import machine, save, table

from protocol.identity import Identity
from shardcast.client import Client
from shardcast.origin import Origin

LR = 1e-6


def model_step(name: str) -> tuple[dict, dict, Path | None]:
    """(weights before, weights after one AdamW step, folder of config/tokenizer files)."""
    from toploc.models import load_model, model_dir

    model, tok = load_model(name, dtype="float32")
    # Tied weights (SmolLM2's embedding and LM head) are stored once, as save_pretrained does.
    seen: set[int] = set()
    keys = []
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            keys.append(k)
    before = {k: model.state_dict()[k].detach().clone() for k in keys}
    model.train()
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ids = tok([text, text[::-1]], return_tensors="pt", padding=True).input_ids
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    after = {k: model.state_dict()[k].detach().clone() for k in keys}
    return before, after, model_dir(name)


def synthetic_step(params: int) -> tuple[dict, dict, None]:
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (params // 4 // 576, 576)}
    per_layer = (params - shapes["embed.weight"][0] * 576) // 6
    for i in range(6):
        shapes[f"layers.{i}.weight"] = (per_layer // 576, 576)
    before = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    after = {k: v + LR * torch.sign(torch.randn(v.shape, generator=g)) for k, v in before.items()}
    return before, after, None


def write_folder(weights: dict, dtype: torch.dtype, folder: Path, extras: Path | None) -> None:
    folder.mkdir(parents=True)
    out = {k: v.to(dtype).contiguous().clone() for k, v in weights.items()}
    save_file(out, str(folder / "model.safetensors"))
    if extras is not None:
        for f in extras.iterdir():
            if (
                f.is_file()
                and f.suffix in (".json", ".txt", ".model")
                and "safetensors" not in f.name
            ):
                shutil.copy(f, folder / f.name)


def changed_fraction(before: dict, after: dict, dtype: torch.dtype) -> float:
    """Fraction of stored elements whose bits differ between the two versions."""
    as_int = torch.int16 if dtype == torch.bfloat16 else torch.int32
    changed = total = 0
    for k in before:
        a, b = before[k].to(dtype).view(as_int), after[k].to(dtype).view(as_int)
        changed += int((a != b).sum())
        total += a.numel()
    return changed / total


async def publish_and_fetch(v1: Path, v2: Path, work: Path) -> dict:
    identity = Identity.generate()
    origin = Origin(work / "origin", identity, "bench", shard_size=16 << 20)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(origin.serve)
        t = time.perf_counter()
        full = await origin.publish(v1, 1)
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        delta = await origin.publish(v2, 2)
        delta_s = time.perf_counter() - t
        client = Client([url], work / "client", public_key=identity.public_key, pool_id="bench")
        await client.fetch(1)
        r = await client.fetch(2)
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert delta.base == 1, "version 2 was not published as a delta"
    return {
        "full_bytes": full.total_bytes,
        "delta_payload_bytes": delta.payload_bytes,
        "fraction": delta.payload_bytes / delta.total_bytes,
        "publish_full_s": full_s,
        "publish_delta_s": delta_s,
        "fetch_and_rebuild_s": r.seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="toploc preset or HF model folder")
    ap.add_argument("--quick", action="store_true", help="synthetic 20M-parameter set")
    ap.add_argument("--synthetic", type=int, metavar="PARAMS", help="synthetic set of this size")
    args = ap.parse_args()
    if args.quick or args.synthetic:
        params = args.synthetic or 20_000_000
        source = f"synthetic {params / 1e6:.0f}M params"
        before, after, extras = synthetic_step(params)
    else:
        source = args.model
        before, after, extras = model_step(args.model)
    work = Path(tempfile.mkdtemp(prefix="shardcast-delta-"))
    rows, result = [], {"machine": machine(), "source": source, "lr": LR, "runs": {}}
    try:
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            d = work / name
            write_folder(before, dtype, d / "v1", extras)
            write_folder(after, dtype, d / "v2", extras)
            r = trio.run(publish_and_fetch, d / "v1", d / "v2", d)
            r["changed_elements"] = changed_fraction(before, after, dtype)
            result["runs"][name] = r
            rows.append([
                name, r["full_bytes"] / 1e6, r["delta_payload_bytes"] / 1e6,
                f"{100 * r['fraction']:.2f}%", f"{100 * r['changed_elements']:.2f}%",
                r["publish_delta_s"], r["fetch_and_rebuild_s"],
            ])  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = f"{source}, one AdamW step at lr {LR}\n\n" + table(
        ["dtype", "full (MB)", "delta (MB)", "delta / full", "elements changed",
         "publish delta (s)", "fetch + rebuild (s)"],
        rows,
    )  # fmt: skip
    save("shardcast_delta" + ("_quick" if args.quick else ""), result, md)


if __name__ == "__main__":
    main()
