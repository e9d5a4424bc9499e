from medlava.launch import main

main()
