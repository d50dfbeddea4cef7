# Session 27, run 4: the embedding writer alone against a zero-store, and K-block writers.
export PYTHONPATH="$PWD" TRITON_INTERPRET=0
timeout 400 python3 benchmarks/probes/s27/writer_probe.py 4096,8192,16384 2>&1 | grep -v Warn | tee $OUT/r4.log
