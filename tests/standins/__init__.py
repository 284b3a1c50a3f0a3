"""Local stand-ins for the platforms sprbot talks to, as real servers on localhost."""
