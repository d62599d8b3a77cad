"""Everyday holes of our own making (not HumanEval): a small file, the cursor at "█", and what a
sensible single-line suggestion there looks like (a regex the suggestion must match whole, but
for trailing whitespace: leading whitespace is wrong, the cursor already stands after what the
line needs; where the cursor stands before an auto-closed bracket, the suggestion may run over it)."""

HOLES = [
    ("return after a computation", "def mean(xs):\n    total = sum(xs)\n    return █\n",
     r"total\s*/\s*len\(xs\)|total\s*/\s*float\(len\(xs\)\)|total"),
    ("the other operand", "def add(a, b):\n    return a + █\n", r"b"),
    ("an attribute from its argument", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n"
     "        self.y = █\n", r"y"),
    ("the main guard", "def main():\n    print('hello')\n\n\nif __name__ == █\n", r"""["']__main__["']:"""),
    ("an exception to catch", "def parse(text):\n    try:\n        return int(text)\n    except █\n",
     r"(ValueError|TypeError|\(ValueError, TypeError\)|Exception)(\s+as\s+\w+)?:"),
    ("a call after self", "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
     "    def push(self, item):\n        self.items.█\n", r"append\(item\)"),
    ("a loop over a list", "def total(prices):\n    result = 0\n    for price in █\n    return result\n",
     r"prices:"),
    ("an accumulation", "def total(prices):\n    result = 0\n    for price in prices:\n        result █\n"
     "    return result\n", r"\+= price"),
    ("a file read", "def read(path):\n    with open(path) as f:\n        return f.█\n",
     r"read\(\)|readlines\(\)|read\(\)\.splitlines\(\)"),
    ("a condition on a length", "def first(items):\n    if len(items) == █\n        return None\n"
     "    return items[0]\n", r"0:"),
    ("a dictionary lookup", "def get_name(user):\n    return user[█]\n", r"""["']name["']\]?"""),
    ("a field of an f-string", 'def greet(user):\n    name = user.name\n    return f"Hello, {█}!"\n',
     r"name|user\.name"),
    ("a body after its signature (an editor's auto-indent)", "def is_empty(items):\n    █\n",
     r"return (len\(items\) == 0|not items|items == \[\])"),
    ("a constructor's first line (an editor's auto-indent)", "class Stack:\n    def __init__(self):\n        █\n",
     r"self\.\w+ = (\[\]|list\(\))"),
    ("a range loop", "def squares(n):\n    out = []\n    for i in range(█):\n        out.append(i * i)\n"
     "    return out\n", r"n(\):)?"),
]


def split(text: str) -> tuple[str, str]:
    prefix, _, suffix = text.partition("█")
    return prefix, suffix
