"""ONNX for onnxruntime: com.microsoft::MatMulNBits at 2/4/8 bits (blocks of 32) and float16
(`tailor.quant.onnx_grid`), a hand-built graph (`tailor.export.onnx`) run by onnxruntime
(`tailor.export.ort`); a model over 2 GB keeps its weights in a side file."""
from tailor.formats.base import Backend

BACKEND = Backend(name="onnx", runtime="onnxruntime", grid_module="tailor.quant.onnx_grid",
                  writer_module="tailor.export.onnx", runner_module="tailor.export.ort", file_name="model.onnx",
                  side_files=("model.onnx.data",), layer_overhead_s=60e-6)
