"""The DIMSE layer: everything that imports pynetdicom lives in this package.

* :mod:`node.dimse.ae` — presentation contexts, transfer syntaxes, sockets (TCP_NODELAY,
  SO_REUSEPORT), PDU size, context batching;
* :mod:`node.dimse.server` — :func:`~node.dimse.server.build_dimse_server` builds the
  receiving AE, its handlers and its server from a :class:`~node.context.NodeContext`;
* :mod:`node.dimse.handlers` — thin adapters from pynetdicom events to the node's services;
* :mod:`node.dimse.qr_loops` — the C-FIND response and C-MOVE / C-GET sub-operation loops;
* :mod:`node.dimse.sender` — the one outgoing C-STORE (C-MOVE, C-GET, ``lamina send``),
  transcoding when the peer lacks the stored transfer syntax;
* :mod:`node.dimse.scu` — ``lamina echo | send | find | move`` as an SCU;
* :mod:`node.dimse.compat` — every private pynetdicom name the node relies on.

Nothing outside this package imports pynetdicom.
"""
