"""transformers' MusicGen `generate` throughput on a checkpoint directory,
the reference side of scripts/musicgen-bench.sh. Same token ids, frames,
guidance (3.0) and top-k (250) as Encore's bench; prints the same columns.

transformers 5's MusicGen `generate` decodes the audio before returning, so
the decode of codes of the same shape is timed on its own and subtracted.
"""

import argparse
import time

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
    print("batch\tframes\tsample_s\tcodes_per_s\tdecode_s")
    for b in map(int, args.batches.split(",")):
        ids = torch.tensor([[3 + i % 5, 4, 5, 1] for i in range(b)])
        mask = torch.ones_like(ids)
        best, decode = float("inf"), float("inf")
        for r in range(args.repeats):
            torch.manual_seed(r)
            with torch.no_grad():
                start = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=250,
                               guidance_scale=3.0, max_length=args.frames + k)
                total = time.perf_counter() - start
                codes = torch.randint(0, model.decoder.config.vocab_size, (1, b, k, args.frames))
                start = time.perf_counter()
                model.audio_encoder.decode(codes, [None] * b)
                dec = time.perf_counter() - start
            best, decode = min(best, total - dec), min(decode, dec)
        print(f"{b}\t{args.frames}\t{best:.3f}\t{b * k * args.frames / best:.1f}\t{decode:.3f}", flush=True)


if __name__ == "__main__":
    main()
