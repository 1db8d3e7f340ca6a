"""``scripts/train-llm``: train the small language model once and show what it writes."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

PROMPTS = ("The for statement", "A class definition", "Exceptions are")


def sample(checkpoint: Path, prompt: str, max_new_tokens: int = 40, seed: int = 0) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    torch.manual_seed(seed)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=0.8, top_k=40, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def main() -> None:
    from edgeship.converter.llm.tinylm import SIZES, TrainSettings, train

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", nargs="?", type=Path, default=Path("build/pydoc-lm"))
    p.add_argument("--steps", type=int, default=TrainSettings.steps)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    trained = train(args.out, TrainSettings(size=args.size, steps=args.steps,
                                            batch_size=args.batch_size))
    print(f"{args.out}: {trained.parameters / 1e6:.2f} M parameters, held-out perplexity "
          f"{trained.heldout_perplexity:.2f}, trained in {trained.train_s:.0f} s")
    for prompt in PROMPTS:
        print(f"--- {prompt!r}\n{sample(args.out, prompt)}")


if __name__ == "__main__":
    main()
