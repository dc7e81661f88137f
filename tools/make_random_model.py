"""Write a random-weight model of a real shape, tensor by tensor, and optionally a random LoRA run for it.

    python tools/make_random_model.py --output_dir /tmp/llama-1.5b --preset llama-1.5b --max_shard_size 1GB \
        --run_dir /tmp/llama-1.5b-run
"""

import argparse
from pathlib import Path

from qlora_kit.bench.random_model import PRESETS, preset_config, write_random_model, write_random_run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--output_dir", required=True, help="Folder for the model (config.json + safetensors shards).")
parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-1.5b", help="The shape.")
parser.add_argument("--num_layers", type=int, default=None, help="Decoder layers (default: the preset's).")
parser.add_argument("--max_shard_size", default="1GB", help="Largest shard, e.g. 1GB.")
parser.add_argument("--device", default="cpu", help="Where the random numbers are drawn (cuda is faster).")
parser.add_argument("--run_dir", default=None, help="Also write a random LoRA run (adapter + run_config.yaml) here.")
parser.add_argument("--lora_r", type=int, default=16, help="Rank of the random adapter.")

if __name__ == "__main__":
    args = parser.parse_args()
    model_dir = write_random_model(Path(args.output_dir), preset_config(args.preset, args.num_layers),
                                   max_shard_size=args.max_shard_size, device=args.device)
    if args.run_dir:
        write_random_run(Path(args.run_dir), model_dir, lora_r=args.lora_r)
