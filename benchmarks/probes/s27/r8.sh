# Session 27, run 8: the GPU tests of the kernel files run 7 may not have reached.
export PYTHONPATH="$PWD" TRITON_INTERPRET=0; timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_launch.py tests/kernels/test_ops.py tests/kernels/test_rms_norm.py tests/kernels/test_rope.py tests/kernels/test_mrope.py tests/kernels/test_layer_norm.py
