from medvlm.cli import main

main()
