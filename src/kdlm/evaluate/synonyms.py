"""Word lists for the perturbations (kdlm.evaluate.perturb), written for kdlm.

WordNet, which synonym augmenters use, cannot be fetched offline, so a short hand-made list of common
words of instructions and word problems stands in for it: each word maps to near-synonyms that keep
the meaning in most contexts (a word-level attack in the sense of PromptBench, not a paraphrase).
"""

from __future__ import annotations

_GROUPS = """
big large huge | small little tiny | fast quick rapid | slow unhurried | happy glad cheerful | sad unhappy
good fine great | bad poor awful | easy simple | hard difficult tough | begin start | end finish complete
buy purchase | sell vend | give hand | get obtain receive | make create produce | use employ utilise
show display | tell inform | say state | ask inquire | answer reply respond | help assist aid
need require | want wish desire | think believe | find discover locate | keep retain | leave depart
walk stroll | run jog sprint | look glance | write compose | read peruse | choose pick select
many numerous | each every | whole entire | total sum | half one-half | part portion | rest remainder
friend pal buddy | money cash funds | job task chore | shop store | car automobile | house home
student pupil | teacher instructor | child kid | man gentleman | woman lady | people persons | person individual
idea notion | story tale | rule regulation | law statute | court tribunal | case matter | claim assertion
evidence proof | statement remark | question query | problem issue | reason cause | result outcome
explain describe | list enumerate | summarize summarise | suggest propose | provide supply | include contain
important significant key | correct right accurate | wrong incorrect | short brief | long lengthy
new fresh novel | old aged ancient | often frequently | usually normally typically | also too
each every | daily everyday | hours hrs | minutes mins | altogether overall
"""

SYNONYMS: dict[str, list[str]] = {}
for _line in _GROUPS.strip().splitlines():
    for _group in _line.split("|"):
        _words = _group.split()
        for _word in _words:
            SYNONYMS.setdefault(_word, []).extend(w for w in _words if w != _word and w not in SYNONYMS.get(_word, []))

# Inserted words: fillers that change no meaning (and carry no number).
FILLERS = ["really", "actually", "just", "basically", "quite", "simply", "certainly", "indeed", "literally", "rather"]

# Appended sentences: irrelevant facts (some with numbers, as in GSM-IC, Shi et al. 2023), tautologies
# (PromptBench's StressTest) and distracting asides.
DISTRACTORS = [
    "The library closes at six on Sundays.",
    "My neighbour has 7 cats and a parrot.",
    "The weather was sunny for 3 days last week.",
    "And true is true.",
    "And false is not true.",
    "Note that the sky is blue.",
    "A train left the station at 9 in the morning.",
    "The shop on the corner sells 40 kinds of tea.",
    "Bananas are rich in potassium.",
    "Ignore the colour of the walls.",
    "The museum has 12 rooms on the ground floor.",
    "Mount Everest is very tall.",
    "Her cousin bought 5 new pencils yesterday.",
    "Water boils at 100 degrees Celsius at sea level.",
    "This sentence has nothing to do with the question.",
    "The recipe calls for 2 cups of flour.",
    "Penguins cannot fly.",
    "It rained in Paris on Tuesday.",
    "The meeting was moved to Thursday.",
    "Remember to drink enough water.",
]
