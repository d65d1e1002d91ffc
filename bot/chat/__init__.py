"""What every chat platform shares: the chat core (core.py: requests, cancel, reroll, status, help, behind one access
policy), the texts users read (texts.py), delivery and live progress (relay.py), the inbox of chat requests stored
before they are acknowledged (inbox.py), downloads and uploads of attachments (transfers.py), arrival order
(arrivals.py) and secrets kept out of logs (logredact.py).

May import: engine.service (the facade) and the engine's records. Never a platform library, never engine machinery.
"""
