"""GGUF for llama.cpp: Q4_0 / Q5_1 / Q8_0 blocks of 32 and F16 (`tailor.quant.gguf_grid`), written with
gguf-py as `llama` or, for per-layer widths, `deci` (`tailor.export.gguf`) with the model's own tokenizer,
run through llama-cpp-python (`tailor.export.llamacpp`), whose CPU kernels also round activations."""
from tailor.formats.base import Backend

BACKEND = Backend(name="gguf", runtime="llama.cpp", grid_module="tailor.quant.gguf_grid",
                  writer_module="tailor.export.gguf", runner_module="tailor.export.llamacpp", file_name="model.gguf",
                  layer_overhead_s=20e-6, runtime_emulation=True, needs_tokenizer_file=True)
