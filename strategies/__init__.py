"""Search strategies, one per file, each registered with ``@register_strategy``.

Installed as ``qsearch.strategies``; ``qsearch.strategy.list_strategies()`` imports them all.
"""
