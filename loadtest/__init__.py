"""Load test (``python -m loadtest``) and benchmark matrix (``python -m loadtest.bench``).

Both drive the real pipeline on the local beanstalkd and nx-27017: producers and consumers
run as separate processes so that the CPU and memory each one uses can be read from /proc
and attributed to it, rather than mixed with the live display or with each other.
"""
