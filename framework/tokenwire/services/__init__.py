"""The gRPC face: the only code that builds or reads ``tokenwire.v1`` messages.

* :mod:`tokenwire.services.chat` — ChatService (Complete, Converse);
* :mod:`tokenwire.services.converse` — one Converse session;
* :mod:`tokenwire.services.models` — ModelService;
* :mod:`tokenwire.services.admin` — AdminService (API keys);
* :mod:`tokenwire.services.convert` — chat messages to and from plain turn types.
"""
