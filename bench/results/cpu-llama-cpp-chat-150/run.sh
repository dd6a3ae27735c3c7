# On a 2-core AMD EPYC CPU (no GPU, fp32 compute), 2026-12-06: llama.cpp as vendored in
# llama-cpp-python 0.3.36 (pip download --no-binary), llama-completion built with
# -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF; Python 3.11.7, torch 2.13.0 (CPU),
# transformers 5.25.0, PEFT 0.21.2, TRL 1.16.0, bitsandbytes 0.50.2, gguf 0.19.0.
# Trains a 150-step 4-bit chat run (2 x 256 packed tokens, 40 held-out conversations), exports it as
# GGUF (F16, Q8_0) and merged, and asks each the 8 held-out questions three ways (30 min in all):
python bench/lab/llama_cpp_chat.py --out bench/results/cpu-llama-cpp-chat-150 --steps 150 \
    --llama llama.cpp/build/bin/llama-completion
# llama.cpp's command for each file and question (conversation mode: the GGUF carries the template):
#   llama-completion -m FILE -p QUESTION -n 24 --temp 0 -st -t 2
