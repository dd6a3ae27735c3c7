# On the 2-core Intel Xeon CPU: llama.cpp as vendored in llama-cpp-python 0.3.36 (pip download --no-binary),
# built for llama-completion with -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF (a native build hit an
# illegal instruction in Q8_0 matmuls on this virtual CPU). The runs are today's `compare` runs of the real
# Gemma 3 270M (bench/results/cpu-compare-today/).
python -m gemma_qlora export --run results/4bit --into gguf --out real/4bit-gguf
python -m gemma_qlora export --run results/8bit --into gguf --out real/8bit-gguf
# then, for each file and each of export.json's prompts:
llama-completion -m FILE -p PROMPT -n 24 --temp 0 --repeat-penalty 1 -s 0 -no-cnv --no-display-prompt --no-escape -c 512 -t 2
# its text (less llama.cpp's " [end of text]") against the continuation export.json records for the same file
