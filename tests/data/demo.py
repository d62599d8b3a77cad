"""A small file to try `lacuna complete` on."""


def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return 


if __name__ == "__main__":
    print([fibonacci(i) for i in range(10)])
