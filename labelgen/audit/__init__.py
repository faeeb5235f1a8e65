"""``labelgen audit``: re-score sampled rows of a label dataset with its teacher and check
every file (docs/AUDIT.md).

Modules: :mod:`~labelgen.audit.run` (one audit, start to finish), :mod:`~labelgen.audit.rows`
(the sample and its stored labels), :mod:`~labelgen.audit.reference` (the teacher run
again), :mod:`~labelgen.audit.compare` (one sequence, the tie rule),
:mod:`~labelgen.audit.draws` (the draw test), :mod:`~labelgen.audit.tolerances` (every
bound), :mod:`~labelgen.audit.report` (the report and its summary), :mod:`~labelgen.audit.cli`.
Nothing heavy is imported here.
"""

__all__: list[str] = []
