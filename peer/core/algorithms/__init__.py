"""How peers train together: one implementation per algorithm behind one interface.

- ``diloco``: the ``diloco`` algorithm.
"""
