"""Random CvT weights with non-zero biases and BatchNorm statistics, for benchmarks.

``create_model`` initialises every Linear bias to zero (as the official code does before
training) and BatchNorm to the identity; a trained model has neither, and zero biases hide
the cost of the bias adds that graph rewrites fold. Usage:

    python scripts/random_weights.py cvt-13 build/cvt13-random.safetensors
    cvt-export --model cvt-13 --weights build/cvt13-random.safetensors --precision fp32,int8 --no-check --out build/cvt13
"""
from __future__ import annotations

import argparse

import torch

from cvt_deploy.checkpoints import save_checkpoint
from cvt_deploy.model import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", help="a registered variant, e.g. cvt-13")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = create_model(args.variant)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(".bias"):
                tensor.normal_(0.0, 0.02)
            elif name.endswith("running_mean"):
                tensor.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
    save_checkpoint(model, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
