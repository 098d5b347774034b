from __future__ import annotations

# The gateway's deadline (s) for one decode step or release; a prefill adds PREFILL_S_PER_TOKEN
# per token fed. It is a backstop for a rank that is alive but stuck: a dead rank fails the step
# at once (its connection drops) and the health probes break its group within seconds. A live
# rank can take seconds on a step that meets a new kernel shape (H200, two ranks: a first
# 8-token prompt after warm-up took 3.4 s, and two concurrent short prompts passed the former
# 5 s deadline, which broke the group and cost a two-minute restart: bench/results/
# serve_e2e_h200x2_tp2_s13_s2_*).
STEP_TIMEOUT_S = 60.0
PREFILL_S_PER_TOKEN = 0.02
