"""`python -m internvl_jax [--model PATH]`: one chat turn with an image, on the built-in demo model
when no model is given (random weights: the answer is gibberish, the pipeline is real)."""

import argparse
import time

import numpy as np
from PIL import Image

from internvl_jax import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m internvl_jax", description=__doc__)
    parser.add_argument("--model", default=None, help="converted or HF checkpoint directory (default: demo)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args()
    start = time.monotonic()
    llm = LLM(args.model, max_model_len=args.max_model_len, max_num_seqs=4)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in this image?"}]}]
    output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=32))[0]
    print(f"prompt: {output.num_prompt_tokens} tokens ({output.num_image_tiles} image tiles)")
    print(f"answer: {output.outputs[0].text!r} (finish_reason={output.outputs[0].finish_reason})")
    print(f"total {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
