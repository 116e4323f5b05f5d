"""The only place that talks to Google APIs: one small class per service.

Each class takes an already-built client, so tests and the local stack pass in
clients pointed at emulators; nothing here reads endpoints itself.
"""
