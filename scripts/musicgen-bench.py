"""transformers' MusicGen `generate` throughput on a checkpoint directory,
the reference side of scripts/musicgen-bench.sh. Same token ids, frames,
guidance (3.0) and top-k (250) as Encore's bench; prints the same columns.

transformers 5's MusicGen `generate` decodes the audio before returning; the
codec's decode is swapped out while `generate` is timed (it returns the codes
instead), and timed on its own on codes of the same shape.
"""

import argparse
import time
from types import SimpleNamespace

import torch
from transformers import MusicgenForConditionalGeneration


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    model = MusicgenForConditionalGeneration.from_pretrained(args.dir).eval()
    k = model.decoder.num_codebooks
    decode = model.audio_encoder.decode
    model.audio_encoder.decode = lambda codes, *a, **kw: SimpleNamespace(audio_values=codes)
    print("batch\tframes\tsample_s\tcodes_per_s\tdecode_s")
    for b in map(int, args.batches.split(",")):
        ids = torch.tensor([[3 + i % 5, 4, 5, 1] for i in range(b)])
        mask = torch.ones_like(ids)
        best, best_decode = float("inf"), float("inf")
        for r in range(args.repeats):
            torch.manual_seed(r)
            with torch.no_grad():
                start = time.perf_counter()
                codes = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=250,
                                       guidance_scale=3.0, max_length=args.frames + k)
                best = min(best, time.perf_counter() - start)
                assert codes.shape == (1, b, k, args.frames), codes.shape
                start = time.perf_counter()
                decode(codes, [None] * b)
                best_decode = min(best_decode, time.perf_counter() - start)
        print(f"{b}\t{args.frames}\t{best:.3f}\t{b * k * args.frames / best:.1f}\t{best_decode:.3f}", flush=True)


if __name__ == "__main__":
    main()
