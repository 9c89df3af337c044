"""Event, subject and settings types shared by selfplay nodes, the daemon and trainers.

Depends on msgspec and the standard library only, so nodes and trainers can import it
without pulling in the daemon's I/O stack.
"""
