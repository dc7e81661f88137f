"""Merge a LoRA run into its base model: python tools/export_merged.py --adapter_dir RUN --output_dir MERGED [--verify].

Every flag: python tools/export_merged.py --help. The work is done by qlora_kit.export.
"""

from qlora_kit.export.cli import main

if __name__ == "__main__":
    main()
