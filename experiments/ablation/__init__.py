"""The paper's ablation (Tables 1 and 2): its rows, the runs' store and the report."""
