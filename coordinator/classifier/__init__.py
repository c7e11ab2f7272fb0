"""Task-complexity classification and swarm planning, served with onnxruntime.

| module | what |
| --- | --- |
| ``limits`` | size limits and ``check_text`` (no numpy/onnxruntime, for the CLI and API) |
| ``model`` | loads the bundled ONNX model, predicts label + calibrated confidence |
| ``reasons`` | turns feature contributions into readable reasons |
| ``planner`` | the swarm-plan rules (``PLAN_RULES``) and how they are applied |
| ``service`` | ``TaskService``: classify/plan on dicts, used by the API, MCP and CLI |
"""
