"""Small Python tasks in evol-codealpaca's schema (``instruction``, ``output``), for
``bench/seed_finetunes.py``: 48 training tasks with reference answers, and 36 held-out tasks,
each with unit tests.

Every instruction names the function and its parameters (``Write a Python function
`count_vowels(s)` that ...``); the tests call exactly that name. The training answers are
in a house style: a single ```python block holding only the function, no prose, no example
calls; either ``terse`` (the default: the shortest body, often one line) or ``steps`` (a
one-line docstring, then each step written out: a loop with an accumulator rather than a
clever one-liner). The held-out tasks are different functions from the training ones (no
name in both; some are close cousins, e.g. ``reverse_words`` trains and ``reverse_string``
is held out). The held-out reference solutions exist only to check the tests (``check()``)
and for the held-out loss; nothing trains on them.

    python bench/data/seed/code_tasks.py      # check every reference against the tests
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

# (signature, what it does, reference solution body, tests). These bodies are the ``steps``
# style: each step written out (a loop rather than a clever one-liner where there is one).
TRAIN: list[tuple[str, str, str, list[str]]] = [
    ("add(a, b)", "returns the sum of two numbers", """
total = a + b
return total
""", ["add(2, 3) == 5"]),
    ("is_even(n)", "returns True if the integer n is even", """
remainder = n % 2
return remainder == 0
""", ["is_even(4)", "not is_even(7)"]),
    ("square_all(nums)", "returns a new list with the square of every number in nums", """
squares = []
for x in nums:
    squares.append(x * x)
return squares
""", ["square_all([1, -2, 3]) == [1, 4, 9]"]),
    ("count_char(s, c)", "returns how many times the character c occurs in the string s", """
count = 0
for ch in s:
    if ch == c:
        count += 1
return count
""", ["count_char('banana', 'a') == 3"]),
    ("reverse_words(sentence)", "returns the sentence with the order of its words reversed", """
words = sentence.split()
words.reverse()
return ' '.join(words)
""", ["reverse_words('a b c') == 'c b a'"]),
    ("max_of_three(a, b, c)", "returns the largest of three numbers", """
largest = a
if b > largest:
    largest = b
if c > largest:
    largest = c
return largest
""", ["max_of_three(1, 9, 4) == 9"]),
    ("first_last(items)", "returns a tuple of the first and the last element of a list", """
first = items[0]
last = items[-1]
return (first, last)
""", ["first_last([1, 2, 3]) == (1, 3)"]),
    ("celsius_to_fahrenheit(c)", "converts a temperature from Celsius to Fahrenheit", """
fahrenheit = c * 9 / 5 + 32
return fahrenheit
""", ["celsius_to_fahrenheit(100) == 212"]),
    ("sum_list(nums)", "returns the sum of a list of numbers, 0 for an empty list", """
total = 0
for x in nums:
    total += x
return total
""", ["sum_list([1, 2, 3]) == 6"]),
    ("product_list(nums)", "returns the product of a list of numbers, 1 for an empty list", """
result = 1
for x in nums:
    result *= x
return result
""", ["product_list([2, 3, 4]) == 24", "product_list([]) == 1"]),
    ("is_vowel(ch)", "returns True if the letter ch is a vowel (a, e, i, o or u, any case)", """
vowels = 'aeiou'
return ch.lower() in vowels
""", ["is_vowel('E')", "not is_vowel('x')"]),
    ("repeat_string(s, n)", "returns the string s repeated n times", """
result = ''
for _ in range(n):
    result += s
return result
""", ["repeat_string('ab', 3) == 'ababab'"]),
    ("remove_spaces(s)", "returns the string s with every space removed", """
kept = []
for ch in s:
    if ch != ' ':
        kept.append(ch)
return ''.join(kept)
""", ["remove_spaces('a b  c') == 'abc'"]),
    ("count_positive(nums)", "returns how many numbers in nums are greater than zero", """
count = 0
for x in nums:
    if x > 0:
        count += 1
return count
""", ["count_positive([1, -1, 0, 5]) == 2"]),
    ("average(nums)", "returns the mean of a list of numbers, or 0 for an empty list", """
if not nums:
    return 0
total = 0
for x in nums:
    total += x
return total / len(nums)
""", ["average([1, 2, 3]) == 2", "average([]) == 0"]),
    ("min_index(nums)", "returns the index of the smallest number in a non-empty list", """
best = 0
for i in range(1, len(nums)):
    if nums[i] < nums[best]:
        best = i
return best
""", ["min_index([4, 1, 3]) == 1"]),
    ("is_leap_year(year)", "returns True if year is a leap year in the Gregorian calendar", """
if year % 400 == 0:
    return True
if year % 100 == 0:
    return False
return year % 4 == 0
""", ["is_leap_year(2000)", "not is_leap_year(1900)", "is_leap_year(2024)"]),
    ("starts_with_capital(s)", "returns True if the string s starts with an uppercase letter", """
if not s:
    return False
return s[0].isupper()
""", ["starts_with_capital('Hi')", "not starts_with_capital('')"]),
    ("double_evens(nums)", "returns a list of the even numbers in nums, each doubled", """
result = []
for x in nums:
    if x % 2 == 0:
        result.append(2 * x)
return result
""", ["double_evens([1, 2, 3, 4]) == [4, 8]"]),
    ("join_with_dash(words)", "joins a list of strings into one string separated by dashes", """
return '-'.join(words)
""", ["join_with_dash(['a', 'b']) == 'a-b'"]),
    ("nth_fibonacci(n)", "returns the n-th Fibonacci number, where nth_fibonacci(0) is 0 and "
     "nth_fibonacci(1) is 1", """
a, b = 0, 1
for _ in range(n):
    a, b = b, a + b
return a
""", ["nth_fibonacci(10) == 55", "nth_fibonacci(0) == 0"]),
    ("gcd(a, b)", "returns the greatest common divisor of two positive integers", """
while b != 0:
    a, b = b, a % b
return a
""", ["gcd(12, 18) == 6"]),
    ("count_words(s)", "returns the number of words in the string s, split on whitespace", """
words = s.split()
return len(words)
""", ["count_words(' one two  three ') == 3"]),
    ("last_char(s)", "returns the last character of a non-empty string", """
return s[-1]
""", ["last_char('abc') == 'c'"]),
    ("is_sorted(nums)", "returns True if the list is sorted in non-decreasing order", """
for i in range(len(nums) - 1):
    if nums[i] > nums[i + 1]:
        return False
return True
""", ["is_sorted([1, 2, 2, 5])", "not is_sorted([3, 1])"]),
    ("filter_long_words(words, n)", "returns the words that are longer than n characters", """
result = []
for w in words:
    if len(w) > n:
        result.append(w)
return result
""", ["filter_long_words(['hi', 'hello', 'hey'], 2) == ['hello', 'hey']"]),
    ("sum_digits(n)", "returns the sum of the decimal digits of a non-negative integer", """
total = 0
for d in str(n):
    total += int(d)
return total
""", ["sum_digits(1234) == 10"]),
    ("abs_diff(a, b)", "returns the absolute difference between two numbers", """
diff = a - b
if diff < 0:
    diff = -diff
return diff
""", ["abs_diff(3, 10) == 7"]),
    ("clamp(x, low, high)", "returns x limited to the range from low to high", """
if x < low:
    return low
if x > high:
    return high
return x
""", ["clamp(15, 0, 10) == 10", "clamp(-5, 0, 10) == 0"]),
    ("capitalize_first(s)", "returns s with its first character in uppercase", """
if not s:
    return s
return s[0].upper() + s[1:]
""", ["capitalize_first('hello') == 'Hello'"]),
    ("unique_sorted(nums)", "returns the distinct numbers of nums in ascending order", """
unique = set(nums)
return sorted(unique)
""", ["unique_sorted([3, 1, 3, 2]) == [1, 2, 3]"]),
    ("sorted_keys(d)", "returns the keys of the dictionary d in sorted order", """
keys = list(d.keys())
keys.sort()
return keys
""", ["sorted_keys({'b': 1, 'a': 2}) == ['a', 'b']"]),
    ("merge_dicts(a, b)", "returns a new dictionary with the items of a and b; b wins on "
     "duplicate keys", """
merged = dict(a)
for key, value in b.items():
    merged[key] = value
return merged
""", ["merge_dicts({'x': 1}, {'x': 2, 'y': 3}) == {'x': 2, 'y': 3}"]),
    ("count_true(flags)", "returns how many values in the list flags are True", """
count = 0
for flag in flags:
    if flag:
        count += 1
return count
""", ["count_true([True, False, True]) == 2"]),
    ("length_map(words)", "returns a dictionary mapping each word to its length", """
lengths = {}
for w in words:
    lengths[w] = len(w)
return lengths
""", ["length_map(['ab', 'c']) == {'ab': 2, 'c': 1}"]),
    ("swap_pair(pair)", "returns the two-element tuple pair with its elements swapped", """
first, second = pair
return (second, first)
""", ["swap_pair((1, 2)) == (2, 1)"]),
    ("is_divisible(a, b)", "returns True if a is divisible by b", """
return a % b == 0
""", ["is_divisible(10, 5)", "not is_divisible(10, 3)"]),
    ("cube(n)", "returns n to the power of three", """
return n * n * n
""", ["cube(3) == 27"]),
    ("range_sum(a, b)", "returns the sum of the integers from a to b, both included", """
total = 0
for i in range(a, b + 1):
    total += i
return total
""", ["range_sum(1, 4) == 10"]),
    ("has_suffix(s, suffix)", "returns True if the string s ends with suffix", """
return s.endswith(suffix)
""", ["has_suffix('report.pdf', '.pdf')"]),
    ("every_other(items)", "returns every other element of a list, starting with the first", """
result = []
for i in range(0, len(items), 2):
    result.append(items[i])
return result
""", ["every_other([1, 2, 3, 4, 5]) == [1, 3, 5]"]),
    ("contains_digit(s)", "returns True if the string s contains at least one digit", """
for ch in s:
    if ch.isdigit():
        return True
return False
""", ["contains_digit('a1')", "not contains_digit('ab')"]),
    ("percent(part, whole)", "returns part as a percentage of whole", """
return part / whole * 100
""", ["percent(1, 4) == 25"]),
    ("join_numbers(nums)", "returns the numbers as one string separated by commas", """
parts = []
for x in nums:
    parts.append(str(x))
return ','.join(parts)
""", ["join_numbers([1, 2, 3]) == '1,2,3'"]),
    ("index_of(items, x)", "returns the index of x in the list, or -1 if it is not there", """
for i in range(len(items)):
    if items[i] == x:
        return i
return -1
""", ["index_of([5, 6], 6) == 1", "index_of([5], 7) == -1"]),
    ("is_blank(s)", "returns True if the string s is empty or only whitespace", """
for ch in s:
    if not ch.isspace():
        return False
return True
""", ["is_blank('  ')", "not is_blank(' a ')"]),
    ("max_word_length(words)", "returns the length of the longest word in a non-empty list", """
longest = 0
for w in words:
    if len(w) > longest:
        longest = len(w)
return longest
""", ["max_word_length(['a', 'abc', 'ab']) == 3"]),
    ("negate_all(nums)", "returns a list with the sign of every number flipped", """
result = []
for x in nums:
    result.append(-x)
return result
""", ["negate_all([1, -2]) == [-1, 2]"]),
]  # fmt: skip

# The first house style tried: the shortest body (often one line), no docstring.
TERSE: dict[str, str] = {
    "add": "return a + b",
    "is_even": "return n % 2 == 0",
    "square_all": "return [x * x for x in nums]",
    "count_char": "return s.count(c)",
    "reverse_words": "return ' '.join(sentence.split()[::-1])",
    "max_of_three": "return max(a, b, c)",
    "first_last": "return (items[0], items[-1])",
    "celsius_to_fahrenheit": "return c * 9 / 5 + 32",
    "sum_list": "total = 0\nfor x in nums:\n    total += x\nreturn total",
    "product_list": "result = 1\nfor x in nums:\n    result *= x\nreturn result",
    "is_vowel": "return ch.lower() in 'aeiou'",
    "repeat_string": "return s * n",
    "remove_spaces": "return s.replace(' ', '')",
    "count_positive": "return sum(1 for x in nums if x > 0)",
    "average": "if not nums:\n    return 0\nreturn sum(nums) / len(nums)",
    "min_index": "return nums.index(min(nums))",
    "is_leap_year": "return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)",
    "starts_with_capital": "return bool(s) and s[0].isupper()",
    "double_evens": "return [2 * x for x in nums if x % 2 == 0]",
    "join_with_dash": "return '-'.join(words)",
    "nth_fibonacci": "a, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nreturn a",
    "gcd": "while b:\n    a, b = b, a % b\nreturn a",
    "count_words": "return len(s.split())",
    "last_char": "return s[-1]",
    "is_sorted": "return all(nums[i] <= nums[i + 1] for i in range(len(nums) - 1))",
    "filter_long_words": "return [w for w in words if len(w) > n]",
    "sum_digits": "return sum(int(d) for d in str(n))",
    "abs_diff": "return abs(a - b)",
    "clamp": "return max(low, min(x, high))",
    "capitalize_first": "return s[:1].upper() + s[1:]",
    "unique_sorted": "return sorted(set(nums))",
    "sorted_keys": "return sorted(d)",
    "merge_dicts": "merged = dict(a)\nmerged.update(b)\nreturn merged",
    "count_true": "return sum(1 for f in flags if f)",
    "length_map": "return {w: len(w) for w in words}",
    "swap_pair": "return (pair[1], pair[0])",
    "is_divisible": "return a % b == 0",
    "cube": "return n ** 3",
    "range_sum": "return sum(range(a, b + 1))",
    "has_suffix": "return s.endswith(suffix)",
    "every_other": "return items[::2]",
    "contains_digit": "return any(ch.isdigit() for ch in s)",
    "percent": "return part / whole * 100",
    "join_numbers": "return ','.join(str(x) for x in nums)",
    "index_of": "for i, item in enumerate(items):\n    if item == x:\n        return i\nreturn -1",
    "is_blank": "return not s.strip()",
    "max_word_length": "return max(len(w) for w in words)",
    "negate_all": "return [-x for x in nums]",
}
STYLES = ("terse", "steps")

# The held-out references are written any way: only the tests matter.
HELD_OUT: list[tuple[str, str, str, list[str]]] = [
    ("count_vowels(s)", "returns the number of vowels (a, e, i, o, u, in any case) in s",
     "return sum(1 for ch in s.lower() if ch in 'aeiou')",
     ["count_vowels('Hello World') == 3", "count_vowels('xyz') == 0",
      "count_vowels('AEIOU') == 5"]),
    ("is_palindrome(s)", "returns True if the string s reads the same forwards and backwards",
     "return s == s[::-1]",
     ["is_palindrome('racecar')", "not is_palindrome('hello')", "is_palindrome('')"]),
    ("factorial(n)", "returns the factorial of a non-negative integer n",
     "result = 1\nfor i in range(2, n + 1):\n    result *= i\nreturn result",
     ["factorial(0) == 1", "factorial(5) == 120", "factorial(10) == 3628800"]),
    ("sum_of_evens(nums)", "returns the sum of the even numbers in the list nums",
     "return sum(x for x in nums if x % 2 == 0)",
     ["sum_of_evens([1, 2, 3, 4]) == 6", "sum_of_evens([]) == 0", "sum_of_evens([1, 3]) == 0"]),
    ("reverse_string(s)", "returns the string s reversed", "return s[::-1]",
     ["reverse_string('abc') == 'cba'", "reverse_string('') == ''"]),
    ("find_max(nums)", "returns the largest number in a non-empty list", "return max(nums)",
     ["find_max([3, 7, 2]) == 7", "find_max([-5, -2]) == -2"]),
    ("fizzbuzz(n)", "returns 'Fizz' if n is divisible by 3, 'Buzz' if by 5, 'FizzBuzz' if by "
     "both, and otherwise n as a string",
     "if n % 15 == 0:\n    return 'FizzBuzz'\nif n % 3 == 0:\n    return 'Fizz'\n"
     "if n % 5 == 0:\n    return 'Buzz'\nreturn str(n)",
     ["fizzbuzz(3) == 'Fizz'", "fizzbuzz(10) == 'Buzz'", "fizzbuzz(30) == 'FizzBuzz'",
      "fizzbuzz(7) == '7'"]),
    ("is_prime(n)", "returns True if the integer n is a prime number",
     "if n < 2:\n    return False\nfor i in range(2, int(n ** 0.5) + 1):\n"
     "    if n % i == 0:\n        return False\nreturn True",
     ["is_prime(2)", "is_prime(13)", "not is_prime(1)", "not is_prime(15)"]),
    ("kelvin_to_celsius(k)", "converts a temperature from kelvin to degrees Celsius",
     "return k - 273.15",
     ["abs(kelvin_to_celsius(273.15)) < 1e-9", "abs(kelvin_to_celsius(300) - 26.85) < 1e-9"]),
    ("count_occurrences(items, x)", "returns how many times x appears in the list items",
     "return items.count(x)",
     ["count_occurrences([1, 2, 1, 1], 1) == 3", "count_occurrences([], 1) == 0"]),
    ("flatten(lists)", "returns one list with the elements of a list of lists, in order",
     "return [x for sub in lists for x in sub]",
     ["flatten([[1, 2], [3], []]) == [1, 2, 3]", "flatten([]) == []"]),
    ("second_largest(nums)", "returns the second largest distinct number in the list nums",
     "return sorted(set(nums))[-2]",
     ["second_largest([1, 5, 3]) == 3", "second_largest([4, 4, 2]) == 2"]),
    ("capitalize_words(s)", "returns s with the first letter of every word in uppercase",
     "return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))",
     ["capitalize_words('hello big world') == 'Hello Big World'"]),
    ("remove_duplicates(items)", "returns the list without duplicates, keeping the first "
     "occurrence of each element in order",
     "seen = set()\nout = []\nfor x in items:\n    if x not in seen:\n        seen.add(x)\n"
     "        out.append(x)\nreturn out",
     ["remove_duplicates([3, 1, 3, 2, 1]) == [3, 1, 2]", "remove_duplicates([]) == []"]),
    ("char_frequency(s)", "returns a dictionary mapping each character of s to how many times "
     "it occurs", "counts = {}\nfor ch in s:\n    counts[ch] = counts.get(ch, 0) + 1\n"
     "return counts", ["char_frequency('aab') == {'a': 2, 'b': 1}", "char_frequency('') == {}"]),
    ("median(nums)", "returns the median of a non-empty list of numbers",
     "values = sorted(nums)\nmid = len(values) // 2\nif len(values) % 2:\n    return values[mid]\n"
     "return (values[mid - 1] + values[mid]) / 2",
     ["median([3, 1, 2]) == 2", "median([4, 1, 3, 2]) == 2.5"]),
    ("is_power_of_two(n)", "returns True if the positive integer n is a power of two",
     "return n > 0 and n & (n - 1) == 0",
     ["is_power_of_two(1)", "is_power_of_two(64)", "not is_power_of_two(12)"]),
    ("sum_of_squares(n)", "returns the sum of the squares of the integers from 1 to n",
     "return sum(i * i for i in range(1, n + 1))",
     ["sum_of_squares(3) == 14", "sum_of_squares(1) == 1"]),
    ("word_lengths(sentence)", "returns a list of the lengths of the words in sentence",
     "return [len(w) for w in sentence.split()]", ["word_lengths('a bb ccc') == [1, 2, 3]"]),
    ("longest_word(words)", "returns the longest string in a non-empty list of words (the "
     "first one if several are equally long)", "return max(words, key=len)",
     ["longest_word(['a', 'abc', 'ab']) == 'abc'", "longest_word(['ab', 'cd']) == 'ab'"]),
    ("digits(n)", "returns the list of decimal digits of a non-negative integer n",
     "return [int(d) for d in str(n)]", ["digits(1203) == [1, 2, 0, 3]", "digits(0) == [0]"]),
    ("count_uppercase(s)", "returns the number of uppercase letters in the string s",
     "return sum(1 for ch in s if ch.isupper())",
     ["count_uppercase('Hello World') == 2", "count_uppercase('abc') == 0"]),
    ("is_anagram(a, b)", "returns True if the strings a and b contain the same letters in "
     "any order", "return sorted(a) == sorted(b)",
     ["is_anagram('listen', 'silent')", "not is_anagram('abc', 'abd')"]),
    ("chunk(items, size)", "splits the list items into consecutive lists of length size "
     "(the last one may be shorter)",
     "return [items[i:i + size] for i in range(0, len(items), size)]",
     ["chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]", "chunk([], 3) == []"]),
    ("common_elements(a, b)", "returns the sorted list of distinct elements found in both "
     "lists a and b", "return sorted(set(a) & set(b))",
     ["common_elements([1, 2, 3], [2, 3, 4]) == [2, 3]", "common_elements([1], [2]) == []"]),
    ("running_total(nums)", "returns the list of running sums of nums",
     "out = []\ntotal = 0\nfor x in nums:\n    total += x\n    out.append(total)\nreturn out",
     ["running_total([1, 2, 3]) == [1, 3, 6]", "running_total([]) == []"]),
    ("to_snake_case(s)", "returns s in lowercase with every space replaced by an underscore",
     "return s.lower().replace(' ', '_')",
     ["to_snake_case('Hello Big World') == 'hello_big_world'"]),
    ("min_max(nums)", "returns a tuple of the smallest and the largest number of a non-empty "
     "list", "return (min(nums), max(nums))",
     ["min_max([3, 1, 2]) == (1, 3)", "min_max([5]) == (5, 5)"]),
    ("count_even(nums)", "returns how many numbers in the list nums are even",
     "return sum(1 for x in nums if x % 2 == 0)",
     ["count_even([1, 2, 4, 5]) == 2", "count_even([]) == 0"]),
    ("reverse_list(items)", "returns a new list with the elements of items in reverse order",
     "return items[::-1]", ["reverse_list([1, 2, 3]) == [3, 2, 1]", "reverse_list([]) == []"]),
    ("scale(nums, k)", "returns a new list with every number of nums multiplied by k",
     "return [x * k for x in nums]", ["scale([1, 2], 3) == [3, 6]", "scale([], 2) == []"]),
    ("lcm(a, b)", "returns the least common multiple of two positive integers",
     "x, y = a, b\nwhile y:\n    x, y = y, x % y\nreturn a * b // x",
     ["lcm(4, 6) == 12", "lcm(5, 7) == 35"]),
    ("acronym(phrase)", "returns the uppercase first letters of the words of phrase",
     "return ''.join(w[0].upper() for w in phrase.split())",
     ["acronym('portable network graphics') == 'PNG'", "acronym('as soon as possible') == 'ASAP'"]),
    ("rotate_left(items, k)", "returns the list rotated k places to the left",
     "if not items:\n    return []\nk %= len(items)\nreturn items[k:] + items[:k]",
     ["rotate_left([1, 2, 3, 4], 1) == [2, 3, 4, 1]", "rotate_left([1, 2, 3], 3) == [1, 2, 3]"]),
    ("hamming_distance(a, b)", "returns the number of positions at which two strings of "
     "equal length differ", "return sum(1 for x, y in zip(a, b) if x != y)",
     ["hamming_distance('karolin', 'kathrin') == 3", "hamming_distance('abc', 'abc') == 0"]),
    ("safe_divide(a, b)", "returns a divided by b, or None when b is zero",
     "if b == 0:\n    return None\nreturn a / b",
     ["safe_divide(6, 3) == 2", "safe_divide(1, 0) is None"]),
]  # fmt: skip

PHRASINGS = (
    "Write a Python function `{sig}` that {what}.",
    "Implement `{sig}` in Python: it {what}.",
    "Create a Python function named `{sig}` which {what}.",
)


def name_of(signature: str) -> str:
    return signature.split("(", 1)[0]


def instruction(index: int, signature: str, what: str) -> str:
    return PHRASINGS[index % len(PHRASINGS)].format(sig=signature, what=what)


def docstring(what: str) -> str:
    """The task in the imperative: "returns the sum ..." -> "Return the sum ..."."""
    verb, _, rest = what.partition(" ")
    return f"{verb[:1].upper()}{verb[1:].removesuffix('s')} {rest}."


def source(signature: str, body: str, what: str | None = None) -> str:
    lines = [f'"""{docstring(what)}"""'] if what else []
    lines += textwrap.dedent(body).strip("\n").splitlines()
    return f"def {signature}:\n" + "".join(f"    {line}\n" for line in lines)


def answer(signature: str, body: str, what: str, style: str = "steps") -> str:
    """The house style: one ```python block with only the function; for ``steps``, under a
    docstring."""
    return f"```python\n{source(signature, body, what if style == 'steps' else None)}```"


def train_rows(style: str = "terse") -> list[dict[str, str]]:
    """The training rows, their answers in house style ``style`` (``terse`` or ``steps``)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    rows = []
    for i, (sig, what, body, _) in enumerate(TRAIN):
        body = TERSE[name_of(sig)] if style == "terse" else body
        rows.append(
            {"instruction": instruction(i, sig, what), "output": answer(sig, body, what, style)}
        )
    return rows


def held_out_rows(style: str = "terse") -> list[dict]:
    """Held-out tasks: the instruction, the reference answer in house style ``style`` (for the
    held-out loss) and the tests."""
    return [
        {
            "instruction": instruction(i, sig, what),
            "output": answer(sig, body, what, style),
            "name": name_of(sig),
            "tests": tests,
        }
        for i, (sig, what, body, tests) in enumerate(HELD_OUT)
    ]


def test_program(code: str, tests: list[str]) -> str:
    """The candidate code, then each test as an assert."""
    checks = "\n".join(f"assert {t}, {t!r}" for t in tests)
    return f"{code}\n\n{checks}\nprint('PASS')\n"


def run_tests(code: str, tests: list[str], timeout: float = 10.0) -> tuple[bool, str]:
    """Run ``code`` and its tests in a fresh Python (isolated mode) with a timeout; True and
    "" on success, else False and the last line of what went wrong."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", test_program(code, tests)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g}s"
    if done.returncode == 0 and done.stdout.rstrip().endswith("PASS"):
        return True, ""
    lines = (done.stderr or done.stdout).strip().splitlines()
    return False, lines[-1][:200] if lines else f"exit status {done.returncode}"


def check() -> int:
    """Every reference solution passes its tests; no function is both trained and held out."""
    failures = 0
    train_names = {name_of(sig) for sig, *_ in TRAIN}
    held_names = {name_of(sig) for sig, *_ in HELD_OUT}
    overlap = train_names & held_names
    if overlap:
        print(f"in both splits: {sorted(overlap)}")
        failures += 1
    if set(TERSE) != train_names:
        print(f"TERSE does not match TRAIN: {sorted(set(TERSE) ^ train_names)}")
        failures += 1
    terse = [(sig, what, TERSE.get(name_of(sig), "pass"), tests) for sig, what, _, tests in TRAIN]
    for split, tasks in (("train", TRAIN), ("train (terse)", terse), ("held-out", HELD_OUT)):
        for sig, what, body, tests in tasks:
            ok, why = run_tests(source(sig, body, what), tests)
            if not ok:
                print(f"{split} {sig}: {why}")
                failures += 1
    print(f"{len(TRAIN)} training and {len(HELD_OUT)} held-out tasks, {failures} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(check())
