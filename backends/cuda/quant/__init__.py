"""GGUF quantised weights kept in their block formats on the GPU (issue 19, the kernel layer).

formats.py  the file's block bytes and their torch dequantisation (bit-equal to gguf's numpy)
repack.py   load-time repack into structure-of-arrays words + f16 scales (same bits, aligned)
gemv.py     Triton decode GEMV on the repacked layout, its tile configs and their timing
kept.py     the executor's side: matmul weights held as blocks (Session(keep_quant=True))
"""
