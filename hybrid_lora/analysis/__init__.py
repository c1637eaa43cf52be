"""Reading result files into tables: no torch anywhere in here (a test checks), so tables and
figures are made on any machine from the JSON a run wrote.

- `stats`              Student-t, the paired t-interval over seeds, paired bootstrap intervals;
- `markdown`           `markdown_table`: the README's tables, from a DataFrame and a spec;
- `cl_results`         continual-learning tables (R-matrix metrics against sequential LoRA),
                       forgetting at matched gain;
- `sweep_results`      rank sweeps: the share of the gain a cut keeps, rank AUC, the sweep tables;
- `rank_flex`          the rank-flexibility benchmark against a LoRA trained at each rank;
- `allocation_results` the allocation study's tables, rank maps, rank per input.

Imports flow one way: stats, markdown <- cl_results, sweep_results <- rank_flex <- allocation_results;
all of them read files through `hybrid_lora.results`.
"""
