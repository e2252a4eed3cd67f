"""Text pools of the seeded workloads (written for this project): names, jobs, habits, events and tasks of the
GenerativeAgents-like village and the AgentSociety-like feed, and the simulated outputs."""

VILLAGE = "Elmbrook"

GA_PEOPLE = [
    # name, age, occupation, home, pronoun
    ("Maya Okafor", 34, "baker who runs the Rising Crust bakery", "a flat above the bakery", "she"),
    ("Tomas Lindqvist", 61, "retired ferry captain who now repairs boats", "a cottage by the harbour", "he"),
    ("Priya Raman", 27, "pharmacist at the village pharmacy", "a rented room on Willow Lane", "she"),
    ("Jonah Whitlock", 45, "owner of the Crooked Lantern pub", "the rooms behind the pub", "he"),
    ("Elena Sokolova", 52, "primary school teacher", "a stone house near the school", "she"),
    ("Samuel Achebe", 19, "student who works weekends at the hardware store", "his parents' farmhouse", "he"),
    ("Hana Kimura", 38, "painter who sells landscapes at the Saturday market", "a studio loft on Mill Street", "she"),
    ("Felix Brandt", 29, "software developer who moved from the city last spring", "a renovated barn", "he"),
    ("Rosa Delgado", 67, "village librarian", "a small house with a large garden", "she"),
    ("Omar Haddad", 41, "grocer who runs the corner shop", "the house next to his shop", "he"),
    ("Ingrid Halvorsen", 36, "veterinarian", "a farmhouse at the edge of the woods", "she"),
    ("Daniel Mercer", 55, "mayor of Elmbrook and part-time beekeeper", "the yellow house on the green", "he"),
    ("Lucia Ferraro", 23, "barista at the Morning Cup cafe", "a shared flat on Harbour Road", "she"),
    ("Kwame Mensah", 48, "carpenter who builds furniture to order", "a workshop house on Oak Row", "he"),
    ("Agnes Pemberton", 74, "retired nurse who chairs the garden club", "a cottage covered in ivy", "she"),
    ("Ravi Chandran", 33, "postman who knows every door in the village", "a terraced house on Station Road", "he"),
]
GA_EXTRA_FIRST = ["Nora", "Theo", "Ada", "Luca", "Mira", "Oskar", "Leila", "Bram", "Iris", "Yusuf", "Clara", "Emil",
                  "Zara", "Hugo", "Freya", "Malik", "Sofia", "Arlo", "Nadia", "Pavel", "Greta", "Idris", "June", "Kofi"]
GA_EXTRA_LAST = ["Ashby", "Novak", "Quinn", "Moreau", "Baptiste", "Carver", "Eriksen", "Holloway", "Ibarra", "Kessler",
                 "Marsh", "Oduya", "Petrov", "Rowan", "Sato", "Thorne", "Vance", "Winslow"]
GA_EXTRA_JOBS = ["fisherman", "florist", "electrician", "nurse at the clinic", "dairy farmer", "bus driver",
                 "tailor", "musician who teaches piano", "plumber", "bookkeeper", "chef at the inn", "gardener",
                 "potter", "mechanic at the garage", "beekeeper", "photographer"]
GA_EXTRA_HOMES = ["a cottage on Bramble Hill", "a flat on Market Square", "a farmhouse past the mill",
                  "a narrow house on Church Lane", "a houseboat in the harbour", "a bungalow near the station"]

GA_TRAITS = ["cheerful", "stubborn", "curious", "shy", "generous", "anxious", "practical", "talkative", "patient",
             "ambitious", "forgetful", "warm", "sarcastic", "thoughtful", "impulsive", "careful", "proud", "gentle",
             "competitive", "hopeful", "honest", "nosy", "restless", "loyal"]
GA_HABITS = [
    "gets up before dawn and walks along the river before work",
    "keeps a notebook of everything that happens in the village",
    "drinks too much coffee and talks fast when excited",
    "hums old songs while working",
    "always knows the latest gossip before anyone else",
    "spends Sunday afternoons fishing off the pier",
    "reads two books a week and recommends them to everyone",
    "volunteers at the community hall every Thursday",
    "is training for the regional half marathon",
    "feeds the stray cats that live behind the church",
    "plays chess at the pub every Wednesday evening",
    "writes letters to a pen pal abroad",
    "is learning to play the cello, badly",
    "collects old maps of the county",
]
GA_CONCERNS = [
    "whether the new road will bring too much traffic",
    "keeping the harbour open to small boats",
    "the rising rent on Market Square",
    "a sick parent in the next town",
    "saving money for a trip to Japan",
    "the state of the footbridge over the river",
    "making the summer fair a success",
    "finding an apprentice to take over one day",
    "a quarrel with an old friend that was never settled",
    "getting the village school a new roof",
    "the flooding in the lower fields last winter",
    "whether to sell the family land",
]
GA_PLACES = ["the bakery", "the Crooked Lantern pub", "the village green", "the harbour", "the library",
             "the Morning Cup cafe", "the corner shop", "the school yard", "the pharmacy", "the community hall",
             "the Saturday market", "the church steps", "the riverside path", "the hardware store",
             "the veterinary clinic", "the town hall"]
GA_ACTIVITIES = ["talked with {other} about the weather", "bought bread and eggs", "repaired a broken fence",
                 "argued with {other} about the parking on Mill Street", "read the notice board",
                 "helped {other} carry boxes", "drank a coffee alone", "listened to {other} complain about the rain",
                 "heard that the summer fair might be cancelled", "saw {other} looking worried",
                 "lent {other} an umbrella", "wrote a shopping list", "planned the week ahead",
                 "noticed a new poster about the harvest dance", "fed the ducks", "paid a bill",
                 "promised {other} to help on Saturday", "found a lost dog and returned it",
                 "laughed with {other} about an old story", "sat on a bench and watched people pass"]
GA_RELATIONS = ["an old school friend", "a neighbour", "a regular customer", "a cousin", "a former colleague",
                "a rival at the village quiz", "a friend from the garden club", "a fellow member of the choir"]
GA_TIMES = ["6:30", "7:00", "7:45", "8:15", "9:00", "10:30", "11:00", "12:15", "13:00", "14:30", "15:00", "16:45",
            "17:30", "18:00", "19:15", "20:00"]
GA_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
GA_EVENTS = [
    "A storm knocked down the old oak on the village green during the night.",
    "The mayor announced that the summer fair will be held at the harbour this year.",
    "A film crew arrived in Elmbrook and is asking for local extras.",
    "The footbridge over the river has been closed after a crack was found.",
    "Someone left a basket of kittens on the library steps.",
    "The bakery's oven broke down and there is no bread this morning.",
    "A stranger in a red coat has been asking about houses for sale.",
    "The school roof leaked during the rain and classes moved to the community hall.",
    "A power cut left the east side of the village dark since dawn.",
    "The harvest dance has been moved forward to this Friday.",
    "A prize-winning goat escaped from the farm and was seen near the church.",
    "The county announced a grant for villages that plant new trees.",
]
GA_QUESTIONS = [
    "Are you coming to the meeting at the town hall tonight?",
    "Did you hear what happened at the harbour this morning?",
    "Can you help me fix the sign outside my shop?",
    "What do you think we should do about the footbridge?",
    "Would you like to join the team for the village quiz?",
    "Have you seen my dog? He ran off an hour ago.",
    "Do you think the summer fair will really happen this year?",
    "Could you keep an eye on my house while I am away?",
]
GA_RULES = (
    "You are {name}. Speak only as {name}, in the first person, in one or two short sentences. "
    "Stay consistent with your persona and memories. Do not repeat what others said word for word, "
    "and do not describe yourself as an AI."
)
GA_GUIDELINES = [
    "Think about who you are likely to meet and what they care about.",
    "Remember your own plans from earlier today.",
    "If someone asked you something, answer them directly.",
    "Mention a place in the village if it helps.",
    "Keep your mood consistent with your recent memories.",
    "Prefer concrete actions over vague feelings.",
    "Be polite, but let your personality show.",
    "Consider how the weather and the time of day affect you.",
    "If an event changes your plans, say how.",
    "Do not invent events that contradict what others said.",
    "Keep it short: a villager does not give speeches.",
    "If you promised to help someone, keep your word.",
]

AS_FIRST = ["ava", "ben", "chen", "dana", "eli", "fatima", "gus", "hiro", "isla", "jay", "kemi", "liam", "mei",
            "noor", "otto", "paz", "quinn", "ray", "sana", "tariq", "uma", "vik", "wren", "xena", "yara", "zed"]
AS_SUFFIX = ["_bikes", "_cooks", "42", "_in_town", "_runs", "_reads", "88", "_plants", "_votes", "_codes",
             "_sings", "_walks", "_ships", "_lens", "_news", "_deals"]
AS_DISTRICTS = ["Northgate", "Riverside", "Old Town", "Harbour Point", "Eastfield", "Hillcrest", "Market Quarter",
                "Southbank"]
AS_JOBS = ["nurse", "delivery rider", "student", "teacher", "retired engineer", "shop assistant", "bus driver",
           "accountant", "chef", "software tester", "cleaner", "small business owner", "journalist",
           "warehouse worker", "hairdresser", "unemployed", "pharmacist", "taxi driver"]
AS_INTERESTS = ["cycling", "local politics", "cooking", "football", "gardening", "housing prices", "public transport",
                "music", "gaming", "climate", "fashion", "street food", "parenting", "fitness", "books", "pets"]
AS_MOODS = ["optimistic", "tired", "annoyed", "curious", "worried", "excited", "bored", "content"]
AS_STANCES = ["trusts the city council", "distrusts big companies", "likes to argue online",
              "rarely posts but reads everything", "shares news without checking it", "jokes about everything",
              "cares mostly about prices", "defends the neighbourhood"]
AS_NEWS = [
    "The city will raise bus fares by 15% next month.",
    "A heat wave is expected to hit the city this weekend.",
    "The council approved a new bike lane through Old Town.",
    "A large supermarket chain plans to close three stores in Eastfield.",
    "Rents in Riverside rose again, the fastest in the country.",
    "The football club won the derby 3-1 last night.",
    "A water main burst in Market Quarter, shops are closed.",
    "The mayor proposed a four-day work week for city staff.",
    "A new clinic opens in Hillcrest on Monday.",
    "Police report a rise in bicycle thefts near the station.",
]
AS_TOPICS = ["the bus fare rise", "the heat wave", "the new bike lane", "rents", "the derby", "store closures",
             "the water main", "the four-day week", "the new clinic", "bike thefts", "weekend plans", "food prices"]
AS_RULES = (
    "You are @{handle}, a resident of the city, posting on the city's social feed. Write one short post of under "
    "100 characters in your own voice. No hashtags lists, no quotes from others."
)
AS_GUIDELINES = [
    "React to what people you follow posted.",
    "Your mood can change with the news.",
    "Keep it casual.",
    "Agree or disagree briefly.",
    "Mention your district if it matters.",
    "Do not repeat a post you already wrote.",
    "Prices and daily life matter most to you.",
    "Use plain words.",
]
AS_FEED_MEMORY = ["liked a post about {interest}", "complained about the traffic in {district}",
                  "shared a photo from {district}", "argued about {topic}", "asked for advice on {interest}",
                  "posted about being {mood}", "followed @{other}", "replied to @{other} about {topic}"]

FAKE_GA = ["I will open the bakery early and save a loaf for {other}.", "I think we should meet at {place} at noon.",
           "That worries me; I will talk to {other} about it.", "Good news! I can help after lunch.",
           "I am heading to {place} to see what happened.", "Let me finish my work first, then I will join you.",
           "Honestly, I do not trust the mayor on this one.", "I will bring tea and biscuits to {place}."]
FAKE_AS = ["ugh, {topic} again. not happy.", "{topic}? finally some good news for {district}!",
           "anyone else in {district} affected by {topic}?", "lol @{other} you are wrong about {topic}",
           "staying home today. too {mood} for this.", "hot take: {topic} is overblown"]


# --------------------------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------------------------
