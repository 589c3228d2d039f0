"""What a run tells its user: the console lines, the tracker (metrics.jsonl and W&B), sample grids, loss-spike captures
and the non-finite guard. Nothing here decides what trains.
"""
