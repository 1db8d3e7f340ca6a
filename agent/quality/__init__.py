"""Model quality in the field, on the device: drift without labels and metrics from feedback.

- ``features``: per-sample summaries of inputs and outputs (the *signals*), the same code
  for the converter's reference profile and the agent's live traffic;
- ``profile``: the reference profile a release carries (parsed and checked, pure);
- ``drift``: Jensen–Shannon distance, PSI, the sliding window of histograms, the
  label-free accuracy estimate's window sums (difference of confidences, ATC beside it), pure;
- ``metrics``: accuracy, precision, recall, F1, MAE/RMSE with confidence intervals, and the
  tests the fleet's gates use (pure; the fleet imports it);
- ``monitor``: the request path (a request id, a reference to the tensors) and the
  vectorised fold that turns batches of requests into window counts and predictions;
- ``feedback`` / ``store``: predictions awaiting a label, in memory and in SQLite (both
  bounded, evictions counted), and the labelled counts per version;
- ``hub``: one object the agent wires in (serving, local API, telemetry, Prometheus).

No raw input leaves the device: telemetry carries histogram counts, scores and counts.
"""
