"""The web edge client (JavaScript modules, a page) and the stdlib server of its page."""
