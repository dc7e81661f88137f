"""Check a GGUF export against the float32 merged model: python tools/check_gguf.py GGUF_FILE MERGED_DIR.

transformers reads the file back and runs the --verify chats; llama.cpp does too when llama-cpp-python
is installed (pip install -e ".[llamacpp]"). The work is done by qlora_kit.bench.gguf_check.
"""

from qlora_kit.bench.gguf_check import main

if __name__ == "__main__":
    main()
