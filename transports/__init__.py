"""Transports Pipecat lacks (direct SIP/RTP). Transports never import the engine."""
