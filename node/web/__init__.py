"""The HTTP front end: DICOMweb (QIDO-RS, WADO-RS, STOW-RS), health and metrics.

The only package that imports Starlette. Routes are thin: they turn a request
into a call on the same services the DIMSE handlers use (``ctx.search``,
``ctx.retrieve``, ``ctx.ingest``) and the outcome into a status:

* :mod:`node.web.app` — ``build_app(ctx)``: routes, identity, CORS, errors;
* :mod:`node.web.identity` — bearer token → configured peer (services, route, audit name);
* :mod:`node.web.dicomweb` — the QIDO-RS, WADO-RS and STOW-RS routes;
* :mod:`node.web.media` — Accept / Content-Type negotiation and multipart bodies;
* :mod:`node.web.dicomjson` — stored instances as DICOM JSON with BulkDataURIs;
* :mod:`node.web.pixels` — frames and rendered images from stored instances;
* :mod:`node.web.health`, :mod:`node.web.metrics` — /livez, /readyz, /metrics;
* :mod:`node.web.server` — uvicorn on a socket, started and stopped with the node.
"""
